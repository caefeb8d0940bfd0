"""Result files: written whole or not at all (a run killed mid-write leaves the previous
file), provenance first."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .paths import RESULTS
from .provenance import provenance


def write_json(path: Path, obj: Any, indent: int | None = 2) -> Path:
    """``obj`` as JSON at ``path``, through a temporary file renamed over it (one per
    process: two benchmark rows run side by side publish the same file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=str))
    tmp.replace(path)
    return path


def write_result(name: str, payload: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    """``out_dir/name.json``: benchmark, date, command, commit, machine, versions, then
    ``payload``."""
    return write_json(Path(out_dir) / f"{name}.json", {**provenance(name), **payload})
