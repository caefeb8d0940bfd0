"""Round checkpoints, and the run's per-round log beside them.

A checkpoint holds what the next round needs and nothing that grows with the run:
global arrays, strategy state, round and the privacy ledger, so writing one costs
O(model + strategy state) every round. ``DIR/checkpoint/`` holds ``state.safetensors``
(the global arrays and the strategy's arrays, e.g. FedAdam's moments) and ``meta.json``
(version, round, config hash, the arrays' and the strategy state's names, and ``extra``:
the privacy ledger and the LR schedule's rounds, plain JSON). No pickle: reading a
checkpoint runs no code from it. The directory is replaced as a whole in one rename; a
run killed mid-write leaves the previous round's checkpoint.

What grows with the run is appended instead (:class:`RunLog`): ``DIR/history.jsonl``, one
row per round (round 0 is the initial evaluation), and ``DIR/clients.jsonl``, one row per
client per round. A round's rows are appended *before* its checkpoint is written, so on
resume rows after the checkpoint's round (a round that was cut short) are dropped and a
torn last line is ignored; the log then matches the checkpoint exactly.

Resuming with more ``federation.rounds`` is allowed (the config fingerprint leaves rounds
out), and the resumed run is the run that was started: the LR schedule keeps spanning the
rounds recorded in the checkpoint (``extra["schedule_rounds"]``), so its first rounds
train exactly as before and the added ones at the schedule's end (``min_lr_ratio``).

Version 3 (issue 30): safetensors + JSON instead of a pickle. Version 2 (issue 14) was a
pickle of this record; version 1 also pickled the whole history. Other versions are
refused with an error naming the version found and the one read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedrag_ray.atomic import atomic_directory, atomic_write_bytes

CHECKPOINT_VERSION = 3
STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
HISTORY_FILE = "history.jsonl"
CLIENTS_FILE = "clients.jsonl"


class CheckpointError(RuntimeError):
    pass


@dataclass
class RoundCheckpoint:
    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, Any]
    config_hash: str
    extra: dict[str, Any] = field(default_factory=dict)
    # other named arrays a round loop must keep (e.g. the model versions that
    # asynchronous clients still train on); saved beside ``arrays``
    aux_arrays: dict[str, np.ndarray] = field(default_factory=dict)


def config_fingerprint(cfg_json: str) -> str:
    """Hash of the parts of a config that must not change between a run and its resume."""
    cfg = json.loads(cfg_json)
    fed = dict(cfg.get("federation") or {})
    fed.pop("rounds", None)  # resuming with more rounds is allowed
    fed.pop("round_timeout_s", None)
    cfg["federation"] = fed
    cfg.pop("tune", None)
    cfg.pop("tracking", None)  # where a run is logged does not change the experiment
    cfg.pop("serve", None)  # nor how its result is served
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(run_dir: str | Path, ckpt: RoundCheckpoint) -> None:
    """Arrays to ``state.safetensors`` (by position: array names go to the JSON), the
    rest to ``meta.json``; atomically, as one directory."""
    from safetensors.numpy import save_file

    tensors = {f"arrays/{i}": _tensor(a) for i, a in enumerate(ckpt.arrays.values())}
    tensors.update({f"aux/{i}": _tensor(a) for i, a in enumerate(ckpt.aux_arrays.values())})
    strategy: dict[str, list[str] | None] = {}
    for attr, value in ckpt.strategy_state.items():
        if value is None:
            strategy[attr] = None
            continue
        strategy[attr] = list(value)
        tensors.update({f"strategy/{attr}/{i}": _tensor(a) for i, a in enumerate(value.values())})
    meta = {
        "version": CHECKPOINT_VERSION,
        "round": ckpt.round,
        "config_hash": ckpt.config_hash,
        "arrays": list(ckpt.arrays),
        "aux_arrays": list(ckpt.aux_arrays),
        "strategy": strategy,
        "extra": ckpt.extra,
    }
    with atomic_directory(Path(run_dir) / "checkpoint") as tmp:
        save_file(tensors, str(tmp / STATE_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, default=_json_default))


def _tensor(a: np.ndarray) -> np.ndarray:
    """C order, as safetensors writes it; a 0-d array stays 0-d (``ascontiguousarray``
    would make it shape (1,))."""
    return np.require(a, requirements="C")


def load_checkpoint(run_dir: str | Path, expected_hash: str | None = None) -> RoundCheckpoint:
    """The checkpoint in ``run_dir``; refused (:class:`CheckpointError`) when missing,
    of another version, or written by another experiment (``expected_hash``)."""
    from safetensors.numpy import load_file

    path = Path(run_dir) / "checkpoint"
    if not (path / META_FILE).exists():
        raise CheckpointError(f"{run_dir}: no complete checkpoint to resume from")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {meta.get('version')} unsupported (this fedrag_ray "
            f"writes and reads version {CHECKPOINT_VERSION}, safetensors + JSON; versions "
            "up to 2 were pickles and are not loaded): start the run afresh"
        )
    if expected_hash and meta["config_hash"] != expected_hash:
        raise CheckpointError(
            f"{path}: checkpoint was written by a different experiment config "
            "(only federation.rounds may change on resume)"
        )
    tensors = load_file(str(path / STATE_FILE))
    arrays = {name: tensors[f"arrays/{i}"] for i, name in enumerate(meta["arrays"])}
    strategy = {
        attr: None
        if names is None
        else {n: tensors[f"strategy/{attr}/{i}"] for i, n in enumerate(names)}
        for attr, names in meta["strategy"].items()
    }
    return RoundCheckpoint(
        round=int(meta["round"]),
        arrays=arrays,
        strategy_state=strategy,
        config_hash=meta["config_hash"],
        extra=meta.get("extra") or {},
        aux_arrays={n: tensors[f"aux/{i}"] for i, n in enumerate(meta.get("aux_arrays", []))},
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class RunLog:
    """``history.jsonl`` (round rows without their clients) and ``clients.jsonl`` (one
    row per client, with its round), appended once per round."""

    def __init__(self, run_dir: str | Path) -> None:
        self.history_path = Path(run_dir) / HISTORY_FILE
        self.clients_path = Path(run_dir) / CLIENTS_FILE

    def reset(self) -> None:
        """A fresh run: no rows of an earlier run in this directory."""
        self.history_path.unlink(missing_ok=True)
        self.clients_path.unlink(missing_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        round_row = {k: v for k, v in row.items() if k != "clients"}
        clients = [{"round": row["round"], **c} for c in row.get("clients", [])]
        _append_lines(self.history_path, [round_row])
        if clients:
            _append_lines(self.clients_path, clients)

    def load(self, upto_round: int) -> list[dict[str, Any]]:
        """The rows of rounds 0..``upto_round`` with their clients re-attached (as the
        rounds were reported); the files are cut back to exactly those rows."""
        history = [r for r in _read_lines(self.history_path) if r["round"] <= upto_round]
        clients = [c for c in _read_lines(self.clients_path) if c["round"] <= upto_round]
        _rewrite_lines(self.history_path, history)
        _rewrite_lines(self.clients_path, clients)
        by_round: dict[int, list[dict[str, Any]]] = {}
        for c in clients:
            by_round.setdefault(c["round"], []).append({k: v for k, v in c.items() if k != "round"})
        rows = []
        for r in history:
            if r["round"] > 0:
                r = {**r, "clients": by_round.get(r["round"], [])}
            rows.append(r)
        return rows


def _encode(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, default=_json_default) + "\n" for r in rows).encode()


def _append_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "ab") as f:
        f.write(_encode(rows))
        f.flush()
        os.fsync(f.fileno())


def _rewrite_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, _encode(rows))


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # torn by a kill mid-append: that round is redone
                break
            raise CheckpointError(f"{path}: line {i + 1} is not JSON") from None
    return rows
