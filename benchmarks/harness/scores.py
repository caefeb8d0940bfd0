"""Per-question scores, kept beside a benchmark's result so that its paired comparisons
outlive the run directories.

A quality benchmark's comparisons are paired differences on the same questions, so they
need every row's per-question scores, not its summary. Run directories are scratch (large,
ignored by git, gone on a new machine): without this file, a row added later could only be
compared with rows re-run beside it. One compact JSON per row, written atomically, keyed by
the row's fingerprint (its resolved config): a row whose config changed is never read back.
The evaluation question ids are stored once per distinct list (rows share them) under their
hash, and checked on read.

Encoding: a score list of only 0 and 1 (exact match, recall@k) is a string of '0' and '1';
any other list is numbers rounded to ``DECIMALS`` places (a bootstrap mean moves by less
than 1e-6); NaN is null.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from .results import write_json

DECIMALS = 6
# what a row keeps besides its scores: what the benchmark's throughput table reads
META_KEYS = ("timings", "token_counts", "wall_s", "train_questions", "num_train")


def ids_hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def encode(values: list[float]) -> str | list[float | None]:
    if values and all(v in (0, 1) for v in values):
        return "".join("1" if v else "0" for v in values)
    return [None if math.isnan(v) else round(float(v), DECIMALS) for v in values]


def decode(stored: str | list[float | None]) -> list[float]:
    if isinstance(stored, str):
        return [1.0 if c == "1" else 0.0 for c in stored]
    return [math.nan if v is None else float(v) for v in stored]


def write_scores(
    folder: Path,
    name: str,
    fingerprint: str,
    command: str,
    eval_ids: list[str],
    per_question: dict[str, list[float]],
    meta: dict[str, Any],
) -> Path:
    """``folder/name.json`` (and the ids under ``folder/eval_ids/``, once)."""
    folder = Path(folder)
    key = ids_hash(eval_ids)
    ids_file = folder / "eval_ids" / f"{key}.json"
    if not ids_file.exists():
        write_json(ids_file, eval_ids, indent=0)
    for metric, values in per_question.items():
        if len(values) != len(eval_ids):
            raise ValueError(f"{name}: {metric} has {len(values)} scores, {len(eval_ids)} ids")
    return write_json(
        folder / f"{name}.json",
        {
            "row": name,
            "fingerprint": fingerprint,
            "command": command,
            "eval_ids": key,
            "per_question": {k: encode(list(v)) for k, v in per_question.items()},
            **{k: meta[k] for k in META_KEYS if k in meta},
        },
        indent=None,  # one line: a row is written once, and a list per line is 5,000 lines
    )


def read_scores(folder: Path, name: str, fingerprint: str) -> dict[str, Any] | None:
    """The row's stored results (``per_question_after``, ``eval_ids`` and its meta keys),
    or None when there are none or they were written for another config."""
    path = Path(folder) / f"{name}.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    if doc.get("fingerprint") != fingerprint:
        return None
    ids = json.loads((Path(folder) / "eval_ids" / f"{doc['eval_ids']}.json").read_text())
    if ids_hash(ids) != doc["eval_ids"]:
        raise ValueError(f"{path}: its question ids do not match their hash {doc['eval_ids']}")
    scores = {k: decode(v) for k, v in doc["per_question"].items()}
    bad = [k for k, v in scores.items() if len(v) != len(ids)]
    if bad:
        raise ValueError(f"{path}: {bad} do not have one score per question ({len(ids)})")
    meta = {k: doc[k] for k in META_KEYS if k in doc}
    return {"per_question_after": scores, "eval_ids": ids, "command": doc["command"], **meta}
