"""Content addresses of knowledge stores: what a store was built from, and the check that
refuses a store built from something else.

A store's manifest carries a ``provenance`` record: the passage encoder (its name and a
hash of its weights), a hash of the passages, the index type and build parameters and,
for a client's private shard, the partition spec (type, alpha, field, seed, client count,
knowledge mode) with the hash of the corpus it was sliced from. Reusing a directory whose
record differs from what this run would build fails with :class:`KnowledgeStoreError`
naming every field that changed; a stale index is never used silently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrag_ray.data import Passage
from fedrag_ray.knowledge_store import MANIFEST, KnowledgeStoreError, read_manifest

if TYPE_CHECKING:
    import torch

    from fedrag_ray.config import ExperimentConfig, KnowledgeStoreConfig
    from fedrag_ray.knowledge_store import KnowledgeStore
    from fedrag_ray.retriever import BiEncoderRetriever

_WEIGHTS_CACHE_ATTR = "_fedrag_weights_sha256"


def _base_name(name: str) -> str:
    """A weight's name without peft's wrapping, so a LoRA-wrapped encoder hashes like
    its base model."""
    return name.replace("base_model.model.", "").replace(".base_layer", "")


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's base weights (names, dtypes, shapes and bytes, in name
    order; LoRA adapters left out). Cached on the module: base weights stay frozen."""
    import torch

    cached = getattr(module, _WEIGHTS_CACHE_ATTR, None)
    if cached:
        return cached
    h = hashlib.sha256()
    state = {_base_name(k): v for k, v in module.state_dict().items() if "lora_" not in k}
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    object.__setattr__(module, _WEIGHTS_CACHE_ATTR, digest)
    return digest


def encoder_record(retriever: BiEncoderRetriever) -> dict[str, str]:
    return {
        "name": retriever.cfg.model,
        "weights_sha256": weights_sha256(retriever.passage_encoder),
    }


def passages_sha256(passages: Iterable[Passage]) -> str:
    h = hashlib.sha256()
    for p in passages:
        h.update(f"{p.id}\0{p.doc_id}\0{p.text}\n".encode())
    return h.hexdigest()


def index_record(ks: KnowledgeStoreConfig) -> dict[str, Any]:
    """Build parameters only: ``nprobe`` is a search setting and may change freely."""
    return {
        "type": ks.index,
        "n_shards": ks.n_shards,
        "nlist": ks.nlist,
        "hnsw_m": ks.hnsw_m,
        "pq_m": ks.pq_m,
    }


def store_provenance(
    retriever: BiEncoderRetriever, passages: list[Passage], ks: KnowledgeStoreConfig
) -> dict[str, Any]:
    return {
        "encoder": encoder_record(retriever),
        "passages_sha256": passages_sha256(passages),
        "index": index_record(ks),
    }


def partition_record(cfg: ExperimentConfig) -> dict[str, Any]:
    fed = cfg.federation
    assert fed is not None
    p = fed.partition
    return {
        "type": p.type,
        "alpha": p.alpha,
        "field": p.field,
        "seed": cfg.seed,
        "num_clients": fed.num_clients,
        "knowledge": fed.knowledge,
        "data_split_seed": cfg.data.split_seed,
    }


def shard_provenance(
    cfg: ExperimentConfig, global_provenance: dict[str, Any], role: str = "private"
) -> dict[str, Any]:
    """A private shard (one FAISS shard) or the public store (the passages no client
    owns, ``knowledge: both``; sharded as configured): sliced from the global store (its
    corpus and encoder) by this partition."""
    ks = cfg.knowledge_store
    if role == "private":
        ks = ks.model_copy(update={"n_shards": 1})
    return {
        "role": role,
        "encoder": global_provenance.get("encoder"),
        "corpus_sha256": global_provenance.get("passages_sha256"),
        "index": index_record(ks),
        "partition": partition_record(cfg),
    }


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) == 64 else text  # hex digests


def differences(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """``field: stored -> expected`` for every field of ``expected`` that differs."""
    have, want = _flatten(stored or {}), _flatten(expected)
    return [
        f"{key}: {_short(have.get(key, 'not recorded'))} -> {_short(value)}"
        for key, value in want.items()
        if have.get(key, "not recorded") != value
    ]


def check_provenance(
    path: str | Path, stored: dict[str, Any], expected: dict[str, Any], fix: str
) -> None:
    """Raise if the store at ``path`` was built from other inputs than ``expected``;
    ``fix`` tells the user how to get a fresh one (which directory to delete or move)."""
    changed = differences(stored, expected)
    if changed:
        raise KnowledgeStoreError(
            f"{path}: this knowledge store was built from other inputs than this run "
            f"uses ({'; '.join(changed)}); {fix}"
        )


def ensure_store(
    path: str | Path,
    expected: dict[str, Any],
    build: Callable[[], KnowledgeStore],
    fix: str,
) -> tuple[int, KnowledgeStore | None]:
    """The one "use the store at ``path`` if it was built from these inputs, else build
    it" of fedrag_ray (a centralized run, a federated run's global store, a sweep's shared
    store). A store on disk is checked by its manifest alone (never loaded here) and
    refused, naming what changed and ``fix``, if its provenance is not ``expected``;
    without one, ``build()`` makes the store (stamped with its provenance) and it is
    saved. Returns (passage count, the store when built here, else None: the caller
    opens it its own way, loaded or served)."""
    path = Path(path)
    if (path / MANIFEST).exists():
        manifest = read_manifest(path)
        check_provenance(path, manifest.get("provenance") or {}, expected, fix)
        return int(manifest["count"]), None
    store = build()
    store.save(path)
    return len(store), store
