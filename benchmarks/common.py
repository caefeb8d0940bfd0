"""The benchmarks' shared names under their first home, for scripts that import
``common``; they live in ``harness/`` (one module per concept), which new code imports.

    from common import RESULTS, machine_info, write_result
"""

from harness.paths import PUBMEDQA as SHARED_DATA
from harness.paths import REPO as ROOT
from harness.paths import RESULTS
from harness.provenance import (
    LOAD_AVERAGE_AT_START,
    PACKAGES,
    cpu_model,
    git_commit,
    machine_info,
    now,
    versions,
)
from harness.results import write_result

__all__ = [
    "LOAD_AVERAGE_AT_START",
    "PACKAGES",
    "RESULTS",
    "ROOT",
    "SHARED_DATA",
    "cpu_model",
    "git_commit",
    "machine_info",
    "now",
    "versions",
    "write_result",
]
