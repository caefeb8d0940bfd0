"""Where a figure came from: UTC date, the exact command, the commit, the machine and the
library versions, so a number quoted in the README can be traced to its run.

The lent hosts differ (Intel with AMX, AMD EPYC with AVX512-BF16 only; bf16 speed-ups
differ ~2x between them), so the machine record carries the CPU model and its bf16 flags.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from .paths import REPO

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "flwr", "ray", "faiss-cpu")

# When the benchmark imported the harness, i.e. when it started: machine_info() itself
# runs when the result is written, at the end.
LOAD_AVERAGE_AT_START = os.getloadavg()


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def command() -> str:
    """The command line as typed, with the interpreter's name only (not its path)."""
    return " ".join([Path(sys.executable).name, *sys.argv])


def git(*args: str) -> str | None:
    """``git ARGS`` in this checkout, stripped; None when git is missing or fails."""
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit() -> str | None:
    """HEAD of this checkout, with ``+dirty`` when tracked code differs from it (results
    the benchmarks write themselves and Markdown do not count)."""
    head = git("rev-parse", "--short", "HEAD")
    if head is None:
        return None
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


def cpu_model() -> dict[str, Any]:
    """The CPU's name and which bf16 instructions it has."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu_model": platform.processor() or None}
    lines = text.splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return {"cpu_model": name, "cpu_bf16": [f for f in ("amx_bf16", "avx512_bf16") if f in flags]}


def gpu_name() -> str | None:
    """The first CUDA device's name, asked of torch only where torch is installed (the
    peer's harness must not need it)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def machine_info(gpu: bool = True) -> dict[str, Any]:
    """CPUs, memory, platform, Python, load average at start, CPU model and bf16 flags,
    and (``gpu``) the CUDA device or None."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": LOAD_AVERAGE_AT_START,
        **cpu_model(),
    }
    if gpu:
        info["cuda"] = gpu_name()
    return info


def versions(names: Iterable[str] = PACKAGES, absent: str | None = None) -> dict[str, str]:
    """Installed versions of ``names``; a missing package is left out, or recorded as
    ``absent`` when that is given."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if absent is not None:
                out[name] = absent
    return out


def provenance(name: str) -> dict[str, Any]:
    """The fields a result file starts with."""
    return {
        "benchmark": name,
        "date": now(),
        "command": command(),
        "commit": git_commit(),
        "machine": machine_info(),
        "versions": versions(),
    }
