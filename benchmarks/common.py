"""What every benchmark records and how it writes its results, in one place.

    from common import RESULTS, machine_info, write_result

A result JSON carries the benchmark name, UTC date, the exact command, the commit, the
machine (CPUs, load average at start, platform, GPU if any) and the library versions, so
a figure quoted in the README can be traced to its run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data" / "pubmedqa" / "pqal_trainval.json"
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "flwr", "ray", "faiss-cpu")


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# When the benchmark process imported this module, i.e. when it started (machine_info()
# itself runs when the result is written, at the end).
LOAD_AVERAGE_AT_START = os.getloadavg()


def cpu_model() -> dict[str, Any]:
    """The CPU's name and its bf16 support: the lent hosts differ (Intel with AMX, AMD EPYC
    with AVX512-BF16 only), and bf16 speed-ups differ ~2x between them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu_model": platform.processor() or None}
    name = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
        None,
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    return {
        "cpu_model": name,
        "cpu_bf16": [f for f in ("amx_bf16", "avx512_bf16") if f in flags],
    }


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": LOAD_AVERAGE_AT_START,
        **cpu_model(),
    }
    try:
        import torch

        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["cuda"] = None
    return info


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """HEAD of this checkout, with ``+dirty`` when tracked code differs from it (results
    the benchmarks write themselves and Markdown do not count)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git(
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            ":(exclude)benchmarks/results",
            ":(exclude)*.md",
        )
        return head + ("+dirty" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def write_result(name: str, payload: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    """``out_dir/name.json`` with the provenance fields first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "date": now(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": git_commit(),
        "machine": machine_info(),
        "versions": versions(),
        **payload,
    }
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(path)
    return path
