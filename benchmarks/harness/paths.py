"""Where benchmarks read and write: all inside the repository, except the data directory,
which is ``../shared/data`` beside the repository root unless ``FEDRAG_RAY_DATA`` names
another."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
# Scratch (data files, stores, run dirs, logs): ignored by git.
SCRATCH = RESULTS / "tmp"
DATA_DIR = Path(os.environ.get("FEDRAG_RAY_DATA") or REPO.parent / "shared" / "data")
PUBMEDQA = DATA_DIR / "pubmedqa" / "pqal_trainval.json"
