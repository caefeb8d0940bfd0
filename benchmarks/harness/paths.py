"""Where benchmarks read and write: results and scratch inside the repository; data from
the data directory, found as fedrag_ray finds it (``fedrag_ray.data.data_dir``, mirrored
here because the peer's venv cannot import fedrag_ray): ``$FEDRAG_RAY_DATA``, else
``../shared/data`` beside the repository where it exists, else the user cache that
``fedrag-ray data download`` fills."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
# Scratch (data files, stores, run dirs, logs): ignored by git.
SCRATCH = RESULTS / "tmp"


def _data_dir() -> Path:
    if os.environ.get("FEDRAG_RAY_DATA"):
        return Path(os.environ["FEDRAG_RAY_DATA"]).expanduser()
    shared = REPO.parent / "shared" / "data"
    return shared if shared.is_dir() else Path.home() / ".cache" / "fedrag_ray" / "data"


DATA_DIR = _data_dir()
PUBMEDQA = DATA_DIR / "pubmedqa" / "pqal_trainval.json"
