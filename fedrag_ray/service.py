"""A RAG system loaded once and kept ready to answer: ``ask``, ``ask --interactive`` and
``serve`` share it.

Why a module: the cost of one answer is almost all set-up (imports, two models, the
knowledge store), so a second question must reuse all of it, and the store must be
built once per corpus and encoder, not once per question: without a configured
``knowledge_store.path`` the store goes to the run directory's own store (a federated
run's ``stores/global``) or to a cache directory keyed by the corpus, the encoder and the
index settings, and every reuse checks its provenance (a stale index is never used).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedrag_ray.config import ConfigError, ExperimentConfig, config_from_dict
from fedrag_ray.data import Passage, RagDataset

STATE_FILE = "trainable_state.npz"
RESULTS_FILE = "results.json"


def run_config(run_dir: str | Path) -> tuple[ExperimentConfig, Path]:
    """The config and trainable state of a ``train`` / ``simulate`` output directory."""
    run_dir = Path(run_dir)
    results = run_dir / RESULTS_FILE
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR: {run_dir} is not a directory")
    if not results.is_file():
        raise ConfigError(f"RUN_DIR: {results} not found (not a train / simulate output)")
    try:
        raw = json.loads(results.read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        raise ConfigError(f"RUN_DIR: {results} is not a results JSON object") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"RUN_DIR: {results} records no config")
    state = run_dir / STATE_FILE
    if not state.is_file():
        raise ConfigError(f"RUN_DIR: {state} not found (the run did not finish?)")
    return config_from_dict(raw, str(results)), state


def load_state(system: Any, state: str | Path) -> None:
    """Load a ``trainable_state.npz``; one that does not fit this config's method or
    models is a user error naming the file, not a traceback."""
    import numpy as np

    try:
        arrays = dict(np.load(state))
    except (OSError, ValueError) as err:
        raise ConfigError(f"--state: {state} is not a readable .npz ({err})") from None
    try:
        system.load_trainable_state(arrays)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(
            f"--state: {state} does not fit this config's train.method and models ({err})"
        ) from None


def _cache_key(cfg: ExperimentConfig, passages: list[Passage]) -> str:
    from fedrag_ray.provenance import index_record, passages_sha256

    rcfg = cfg.retriever
    record = {
        "passages": passages_sha256(passages),
        "encoder": [rcfg.model, rcfg.max_length],
        "index": index_record(cfg.knowledge_store),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def store_cache_path(cfg: ExperimentConfig, passages: list[Passage]) -> Path:
    from fedrag_ray.models import cache_dir

    return cache_dir() / "stores" / _cache_key(cfg, passages)


def open_store(
    system: Any,
    passages: list[Passage],
    run_dir: str | Path | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> Path:
    """Give ``system`` its knowledge store and return where it lives: the configured
    ``knowledge_store.path`` (checked, built if missing, as ``train`` does), else the
    run's own global store if it matches, else the cache entry for these inputs (built
    on the first call, rebuilt if its provenance no longer matches)."""
    from fedrag_ray.centralized import prepare_store
    from fedrag_ray.knowledge_store import MANIFEST, KnowledgeStore, KnowledgeStoreError
    from fedrag_ray.provenance import differences, store_provenance

    phase = on_phase or (lambda _m: None)
    ks = system.cfg.knowledge_store
    if ks.path:
        phase(f"opening the knowledge store {ks.path}")
        prepare_store(system, RagDataset(train=[], eval=[], passages=passages))
        return Path(ks.path)
    expected = store_provenance(system.retriever, passages, ks)
    candidates = [store_cache_path(system.cfg, passages)]
    if run_dir is not None:
        candidates.insert(0, Path(run_dir) / "stores" / "global")
    for path in candidates:
        if not (path / MANIFEST).is_file():
            continue
        try:
            store = KnowledgeStore.load(path, expected_dim=system.retriever.dim, device=ks.device)
        except KnowledgeStoreError:
            continue  # a corrupt cache entry is rebuilt below
        if not differences(store.provenance, expected):
            phase(f"opened the knowledge store {path}")
            system.store = store
            return path
    target = candidates[-1]
    phase(f"indexing {len(passages)} passages into {target}")
    store = system.build_store(passages)
    store.save(target)
    return target


def answer_record(ans: Any, text_chars: int = 200) -> dict[str, Any]:
    """The JSON shape of an answer (``ask`` prints it, ``serve`` returns it)."""
    return {
        "answer": ans.answer,
        "sources": [
            {"id": p.id, "doc_id": p.doc_id, "score": float(s), "text": p.text[:text_chars]}
            for p, s in zip(ans.passages, ans.scores, strict=True)
        ],
    }


def data_fingerprint(cfg: ExperimentConfig) -> str | None:
    """A cheap key for "the same corpus as last time": the data section and each data
    file's resolved path, size and modification time (as ``make`` decides), plus what
    the store depends on besides the passages. None when a file cannot be stat'ed."""
    from fedrag_ray.data import resolve_data_path
    from fedrag_ray.provenance import index_record

    files = []
    for field in ("path", "corpus", "eval_path"):
        value = getattr(cfg.data, field)
        if value:
            try:
                p = resolve_data_path(value, f"data.{field}").resolve()
                st = p.stat()
            except (OSError, ValueError):
                return None
            files.append([str(p), st.st_size, st.st_mtime_ns])
    rcfg = cfg.retriever
    record = {
        "data": cfg.data.model_dump(mode="json"),
        "files": files,
        "encoder": [rcfg.model, rcfg.max_length],
        "index": index_record(cfg.knowledge_store),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint_file(fingerprint: str) -> Path:
    from fedrag_ray.models import cache_dir

    return cache_dir() / "stores" / "by-data" / f"{fingerprint}.json"


def _open_remembered_store(system: Any, fingerprint: str) -> Path | None:
    """The cached store this data fingerprint was last answered from, if it is still
    there and still matches the encoder and index settings (its passages were checked
    against the data when it was remembered): then ``ask`` need not parse the data."""
    from fedrag_ray.knowledge_store import KnowledgeStore, KnowledgeStoreError
    from fedrag_ray.provenance import differences, store_provenance

    try:
        path = Path(json.loads(_fingerprint_file(fingerprint).read_text())["store"])
        store = KnowledgeStore.load(
            path, expected_dim=system.retriever.dim, device=system.cfg.knowledge_store.device
        )
    except (OSError, ValueError, KeyError, TypeError, KnowledgeStoreError):
        return None
    expected = store_provenance(system.retriever, [], system.cfg.knowledge_store)
    expected.pop("passages_sha256")
    if differences(store.provenance, expected):
        return None
    system.store = store
    return path


class Answerer:
    """Config → data → models (+ trainable state) → store, once; then ``ask`` per
    question costs one retrieval and one generation."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        state: str | Path | None = None,
        run_dir: str | Path | None = None,
        on_phase: Callable[[str], None] | None = None,
        threads: int | None = None,
    ) -> None:
        """``threads``: torch's intra-op threads (None: torch's default, one per core)."""
        from fedrag_ray.data import load_dataset_from_config
        from fedrag_ray.rag import RAGSystem
        from fedrag_ray.runtime import configure_process

        phase = on_phase or (lambda _m: None)
        t = time.perf_counter()
        configure_process(threads)  # imports torch and transformers: part of the cost
        phase("loading models")
        self.system = RAGSystem(cfg)
        if state is not None:
            load_state(self.system, state)
        # A configured store path is checked against the data every time (as train does);
        # the cache is found again by the data files' fingerprint, without parsing them.
        fingerprint = None if cfg.knowledge_store.path else data_fingerprint(cfg)
        remembered = fingerprint and _open_remembered_store(self.system, fingerprint)
        if remembered:
            self.store_path = remembered
        else:
            phase("loading data")
            data = load_dataset_from_config(cfg.data)
            self.store_path = open_store(self.system, data.passages, run_dir, phase)
            if fingerprint and self.store_path == store_cache_path(cfg, data.passages):
                from fedrag_ray.atomic import atomic_write_json

                atomic_write_json(
                    _fingerprint_file(fingerprint), {"store": str(self.store_path.resolve())}
                )
        self.system.generator.model.eval()
        self.load_seconds = time.perf_counter() - t

    @property
    def cfg(self) -> ExperimentConfig:
        return self.system.cfg

    def ask(self, question: str) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            return answer_record(self.system.answer(question))
