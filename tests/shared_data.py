"""Test data read from the shared data directory, never from files in this repository.

The PubMedQA "sample" the tests use is the first 200 items (by PubMed id) of the
PQA-L train/validation file in ``$FEDRAG_RAY_DATA`` (``../shared/data`` here), with the
fields the loaders read. A missing file fails with the path it looked for; nothing is
skipped."""

from __future__ import annotations

import copy
import functools
import json
import os
import tempfile
from pathlib import Path

PUBMEDQA = "data:pubmedqa/pqal_trainval.json"
SQUAD = "data:squad/squad-train-v1.1.json.gz"
SAMPLE_SIZE = 200
_FIELDS = ("QUESTION", "CONTEXTS", "LABELS", "MESHES", "YEAR", "LONG_ANSWER", "final_decision")


@functools.lru_cache(maxsize=1)
def _sample() -> dict:
    from fedrag_ray.data import resolve_data_path

    full = json.loads(resolve_data_path(PUBMEDQA).read_text())
    keys = sorted(full)[:SAMPLE_SIZE]
    return {k: {f: full[k][f] for f in _FIELDS if f in full[k]} for k in keys}


def pubmedqa_sample_raw() -> dict:
    """The 200-item sample as PQA-L's JSON object (a fresh copy: tests edit it)."""
    return copy.deepcopy(_sample())


def write_pubmedqa_items(path: Path, n: int) -> Path:
    """The sample's first ``n`` items written to ``path``: a corpus small enough to embed
    in seconds for a test run."""
    path.write_text(json.dumps(dict(list(_sample().items())[:n])))
    return path


@functools.lru_cache(maxsize=1)
def pubmedqa_sample_path() -> Path:
    """The sample written once per user to a temp file (atomically: xdist workers race)."""
    folder = Path(tempfile.gettempdir()) / f"fedrag_ray_tests_{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pubmedqa_sample.json"
    text = json.dumps(_sample())
    if not path.exists() or path.read_text() != text:
        tmp = folder / f".pubmedqa_sample.{os.getpid()}.tmp"
        tmp.write_text(text)
        tmp.replace(path)
    return path
