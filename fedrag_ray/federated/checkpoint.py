"""Round checkpoints: global parameters, strategy state, round, RNG state and history,
written atomically after every round so ``--resume`` continues from the last complete one.

Layout: ``DIR/checkpoint/`` holds ``state.pkl`` and ``meta.json`` and is replaced as a whole
directory in one rename; a run killed mid-write leaves the previous round's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrag_ray.atomic import atomic_directory

CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


@dataclass
class RoundCheckpoint:
    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, Any]
    history: list[dict[str, Any]]
    config_hash: str
    python_random_state: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def config_fingerprint(cfg_json: str) -> str:
    """Hash of the parts of a config that must not change between a run and its resume."""
    cfg = json.loads(cfg_json)
    fed = dict(cfg.get("federation") or {})
    fed.pop("rounds", None)  # resuming with more rounds is allowed
    fed.pop("round_timeout_s", None)
    cfg["federation"] = fed
    cfg.pop("tune", None)
    cfg.pop("tracking", None)  # where a run is logged does not change the experiment
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(run_dir: str | Path, ckpt: RoundCheckpoint) -> None:
    with atomic_directory(Path(run_dir) / "checkpoint") as tmp:
        with open(tmp / "state.pkl", "wb") as f:
            pickle.dump(ckpt, f, protocol=pickle.HIGHEST_PROTOCOL)
        meta = {
            "version": CHECKPOINT_VERSION,
            "round": ckpt.round,
            "config_hash": ckpt.config_hash,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))


def load_checkpoint(run_dir: str | Path, expected_hash: str | None = None) -> RoundCheckpoint:
    path = Path(run_dir) / "checkpoint"
    if not (path / "meta.json").exists():
        raise CheckpointError(f"{run_dir}: no complete checkpoint to resume from")
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')} unsupported")
    if expected_hash and meta["config_hash"] != expected_hash:
        raise CheckpointError(
            f"{path}: checkpoint was written by a different experiment config "
            "(only federation.rounds may change on resume)"
        )
    with open(path / "state.pkl", "rb") as f:
        ckpt: RoundCheckpoint = pickle.load(f)
    if ckpt.python_random_state is not None:
        random.setstate(ckpt.python_random_state)
    return ckpt
