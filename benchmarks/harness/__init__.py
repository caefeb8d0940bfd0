"""What every benchmark shares, one concept per module:

- ``paths``: the repository, the results folder, the data directory;
- ``env``: the offline / no-telemetry environment the benchmarks run in;
- ``provenance``: date, command, commit, machine (CPU model, bf16 flags), versions;
- ``results``: atomic JSON, and a result file with its provenance first;
- ``memory``: peak RSS / PSS and CPU seconds of process trees, sampled in a thread;
- ``plots``: figure setup, PNG saving and honest axes (imported on its own: matplotlib).

A benchmark run as ``python benchmarks/<name>.py`` has ``benchmarks/`` first on its
``sys.path`` and imports ``harness`` like any package. ``peer/run_peer.py`` runs in the
peer's own venv and loads this package by path; so everything here except ``plots`` uses
only the standard library and psutil, and nothing imports fedrag_ray. psutil itself is
imported only with ``memory`` (on first use of its names here): provenance and results
work without it (the lent GPU machine's image need not have it).
"""

from typing import Any

from .env import OFFLINE_ENV, offline_env
from .paths import DATA_DIR, PUBMEDQA, REPO, RESULTS, SCRATCH
from .provenance import (
    command,
    cpu_model,
    git,
    git_commit,
    machine_info,
    now,
    provenance,
    versions,
)
from .results import write_json, write_result

_MEMORY = ("SubprocessSampler", "TreeCpu", "TreeSampler", "process_tree")


def __getattr__(name: str) -> Any:
    if name in _MEMORY:
        from . import memory

        return getattr(memory, name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")


__all__ = [
    "DATA_DIR",
    "OFFLINE_ENV",
    "PUBMEDQA",
    "REPO",
    "RESULTS",
    "SCRATCH",
    "SubprocessSampler",
    "TreeCpu",
    "TreeSampler",
    "command",
    "cpu_model",
    "git",
    "git_commit",
    "machine_info",
    "now",
    "offline_env",
    "process_tree",
    "provenance",
    "versions",
    "write_json",
    "write_result",
]
