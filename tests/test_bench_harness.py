"""The benchmarks' shared harness (``benchmarks/harness``): the process-tree memory
sampler sees a child's memory, result files are written whole with their provenance
first, plot axes are what they say, and the harness (with ``peer/run_peer.py``, which
loads it by path in the peer's own venv) needs nothing beyond the standard library and
psutil."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MIB = 2**20


def load_harness() -> ModuleType:
    """By path, as ``peer/run_peer.py`` does (``benchmarks/`` is not a package)."""
    if "harness" in sys.modules:
        return sys.modules["harness"]
    init = BENCHMARKS / "harness" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "harness", init, submodule_search_locations=[str(init.parent)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["harness"] = module
    spec.loader.exec_module(module)
    return module


harness = load_harness()

# A child that holds ~200 MiB (touched, so resident) until its stdin closes.
HOLDER = "b = bytearray(200 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\n" + (
    "print('ready', flush=True)\nimport sys; sys.stdin.read()\n"
)


def _start_holder() -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_tree_sampler_sums_a_child_into_the_tree() -> None:
    child = _start_holder()
    try:
        with harness.TreeSampler(interval=0.05, pss_every=1) as sampler:
            time.sleep(0.3)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert sampler.samples >= 2
    assert sampler.peak_by_pid[child.pid] >= 190 * MIB
    assert sampler.peak_rss >= sampler.peak_by_pid[os.getpid()] + 190 * MIB
    assert sampler.peak_pss >= 190 * MIB
    assert sampler.peak_by_root["self"] == sampler.peak_rss  # one root: the whole tree
    assert sampler.max_procs >= 2
    assert sampler.cpu.total() > 0
    assert child.pid in sampler.names


def test_tree_sampler_keeps_peaks_per_named_root_and_counts_exited_cpu() -> None:
    child = _start_holder()
    with harness.TreeSampler({"holder": child.pid}, interval=0.05, pss_every=0) as sampler:
        time.sleep(0.2)
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
        time.sleep(0.15)  # samples after the child is gone must not lower the peak
    assert sampler.peak_pss == 0  # pss_every=0 never reads PSS
    assert sampler.peak_by_root["holder"] >= 190 * MIB
    assert sampler.peak_rss == sampler.peak_by_root["holder"]
    assert sampler.cpu.total() > 0  # the exited child's CPU seconds stay counted


def test_subprocess_sampler_sees_the_driver_and_excludes_itself() -> None:
    with harness.SubprocessSampler(interval=0.05, relist_s=0.1) as sampler:
        block = bytearray(200 * MIB)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(0.5)
        cpu = sampler.cpu_seconds()
    del block
    assert sampler.peak_root >= 200 * MIB
    assert sampler.peak_rss >= sampler.peak_root
    assert cpu > 0
    assert sampler._proc is not None and sampler._proc.pid not in sampler._cpu.seconds


def test_write_result_is_atomic_and_starts_with_provenance(tmp_path: Path) -> None:
    path = harness.write_result("demo", {"figure": 1.5}, tmp_path)
    doc = json.loads(path.read_text())
    assert list(doc)[:6] == ["benchmark", "date", "command", "commit", "machine", "versions"]
    assert doc["benchmark"] == "demo" and doc["figure"] == 1.5
    machine = doc["machine"]
    assert {"cpus", "memory_gib", "cpu_model", "load_average_at_start", "cuda"} <= set(machine)
    assert machine["memory_gib"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["demo.json"]  # no temporary left
    harness.write_json(path, {"replaced": True})
    assert json.loads(path.read_text()) == {"replaced": True}


def test_data_dir_is_the_one_fedrag_ray_reads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The harness mirrors ``fedrag_ray.data.data_dir`` (the peer's venv cannot import it):
    a benchmark and the library it measures read the same files."""
    from fedrag_ray.data import data_dir

    monkeypatch.delenv("FEDRAG_RAY_DATA", raising=False)
    assert harness.paths._data_dir() == data_dir()
    monkeypatch.setenv("FEDRAG_RAY_DATA", str(tmp_path))
    assert harness.paths._data_dir() == data_dir() == tmp_path


def test_versions_records_missing_packages_only_when_asked() -> None:
    missing = "no-such-package-fedrag-ray-test"
    assert harness.versions(["psutil", missing]).keys() == {"psutil"}
    assert harness.versions([missing], absent="absent") == {missing: "absent"}


def test_plot_helpers_set_the_axes_they_promise(tmp_path: Path) -> None:
    from harness.plots import figure, integer_ticks, rate_axis, save, zero_based
    from matplotlib.ticker import MaxNLocator

    fig, (a, b, c) = figure(3, size=(6, 2))
    a.plot([1, 2, 3], [5e8, 6e8, 7e8])
    zero_based(a)
    b.bar([0, 1], [0.2, 0.9])
    rate_axis(b, "recall@5")
    c.plot([1, 2, 3], [1, 4, 9])
    integer_ticks(c)
    path = save(fig, tmp_path / "f.png")
    assert a.get_ylim()[0] == 0 and a.get_ylim()[1] >= 7e8
    assert b.get_ylim() == (0, 1.05) and b.get_ylabel() == "recall@5"
    assert isinstance(c.xaxis.get_major_locator(), MaxNLocator)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


ONLY_STDLIB_AND_PSUTIL = """
import json, sys
before = set(sys.modules)  # what site startup loaded (.pth hooks)
allowed = set(sys.stdlib_module_names) | {"psutil", "harness", "run_peer"}

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in allowed:
            raise ImportError(f"not in the peer's harness budget: {name}")
        return None

sys.meta_path.insert(0, Refuse())
import importlib.util
spec = importlib.util.spec_from_file_location("run_peer", sys.argv[1])
run_peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_peer)
h = run_peer.harness
assert h.versions(["psutil"]).keys() == {"psutil"}
with h.TreeSampler(interval=0.01) as s:
    pass
assert s.peak_rss > 0
h.write_json(__import__("pathlib").Path(sys.argv[2]), {"ok": True})
new = set(sys.modules) - before - {"__main__"}
print(json.dumps(sorted(m for m in new if m.split(".")[0] not in sys.stdlib_module_names)))
"""


def test_run_peer_and_the_harness_need_only_stdlib_and_psutil(tmp_path: Path) -> None:
    """What the peer's venv must provide to run_peer.py's module level and the harness
    parts it uses: any other import (fedrag_ray, numpy, matplotlib) fails here."""
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            textwrap.dedent(ONLY_STDLIB_AND_PSUTIL),
            str(BENCHMARKS / "peer" / "run_peer.py"),
            str(tmp_path / "ok.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "ok.json").read_text()) == {"ok": True}
    third_party = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert "harness" in third_party and third_party <= {"psutil", "harness", "run_peer"}


NO_PSUTIL = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "psutil":
            raise ImportError("psutil refused")
        return None

sys.meta_path.insert(0, Refuse())
import pathlib
import harness
path = harness.write_result("demo", {}, pathlib.Path(sys.argv[1]))
print("psutil" in sys.modules, path.exists())
"""


def test_provenance_and_results_work_without_psutil(tmp_path: Path) -> None:
    """gpu_path.py's GPU half runs on a lent machine whose image need not have psutil:
    writing a result must not import it (the sampler does, on first use)."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NO_PSUTIL), str(tmp_path)],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
    assert json.loads((tmp_path / "demo.json").read_text())["machine"]["memory_gib"] > 0


@pytest.mark.parametrize("name", ["RESULTS", "machine_info", "write_result", "versions"])
def test_common_keeps_its_names(name: str) -> None:
    """Scripts that import ``common`` (run from benchmarks/) keep working."""
    code = f"import common, harness; print(common.{name} is getattr(harness, '{name}'))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=BENCHMARKS, capture_output=True, text=True
    )
    assert out.stdout.strip() == "True", out.stderr
