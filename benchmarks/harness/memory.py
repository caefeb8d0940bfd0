"""Peak memory and CPU seconds of process trees, sampled in a thread (or, where a thread
would take the measured process's GIL, in a helper process).

A *tree* is a root process and all its descendants: a driver with Ray's GCS, raylet,
workers and actors; a Flower server or client process. Every sample sums RSS over the
trees and, every ``pss_every``-th sample, PSS (shared pages counted once; reading it costs
~10x more). The peaks are kept overall, per root and per process; CPU seconds per process,
an exited process counting with its last reading.

Standard library and psutil only: ``peer/run_peer.py`` loads this in the peer's own venv.
This file also runs as a script, the helper process of ``SubprocessSampler``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import psutil


def process_tree(pid: int | None = None, exclude: Collection[int] = ()) -> list[psutil.Process]:
    """``pid`` (default: this process) and its live descendants, less ``exclude``; empty
    when ``pid`` is gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    return [p for p in procs if p.pid not in exclude]


class TreeCpu:
    """User + system CPU seconds of the trees under ``roots`` (default: this process)."""

    def __init__(self, roots: Collection[int] | None = None, exclude: Collection[int] = ()):
        self.roots = list(roots) if roots else [os.getpid()]
        self.exclude = set(exclude)
        self.seconds: dict[int, float] = {}  # pid -> its last reading
        self._lock = threading.Lock()

    def record(self, proc: psutil.Process) -> None:
        """Read one process (raises ``psutil.Error`` when it is gone)."""
        t = proc.cpu_times()
        with self._lock:
            self.seconds[proc.pid] = t.user + t.system

    def total(self) -> float:
        """Seconds as last read, without reading again."""
        with self._lock:
            return float(sum(self.seconds.values()))

    def __call__(self) -> float:
        """Read every live process of the trees now; the total so far."""
        for root in self.roots:
            for proc in process_tree(root, self.exclude):
                try:
                    self.record(proc)
                except psutil.Error:
                    continue
        return self.total()


class TreeSampler(threading.Thread):
    """Peak summed RSS / PSS of the trees ``roots`` (name -> pid; default this process),
    every ``interval`` s until ``stop()``, which takes one last sample.

    ``relist_s`` > 0 lists the trees' processes again only that often (listing scans all
    of /proc); ``pss_every`` 0 never reads PSS.
    """

    def __init__(
        self,
        roots: Mapping[str, int] | None = None,
        interval: float = 0.2,
        pss_every: int = 5,
        relist_s: float = 0.0,
        exclude: Collection[int] = (),
    ) -> None:
        super().__init__(daemon=True)
        self.roots = dict(roots) if roots else {"self": os.getpid()}
        self.interval, self.pss_every, self.relist_s = interval, pss_every, relist_s
        self.exclude = set(exclude)
        self.stop_event = threading.Event()
        self.cpu = TreeCpu(self.roots.values(), self.exclude)
        self.peak_rss = self.peak_pss = self.samples = self.max_procs = 0
        self.peak_by_root: dict[str, int] = {}
        self.peak_by_pid: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self._trees: dict[str, list[psutil.Process]] = {}
        self._listed_at = -float("inf")

    def sample(self) -> None:
        """One reading of every process in the trees."""
        if time.monotonic() - self._listed_at >= self.relist_s:
            self._trees = {n: process_tree(pid, self.exclude) for n, pid in self.roots.items()}
            self._listed_at = time.monotonic()
        want_pss = self.pss_every > 0 and self.samples % self.pss_every == 0
        total_rss = total_pss = 0
        self.max_procs = max(self.max_procs, sum(len(t) for t in self._trees.values()))
        for name, procs in self._trees.items():
            tree_rss = 0
            for proc in procs:
                try:
                    info = proc.memory_full_info() if want_pss else proc.memory_info()
                    self.cpu.record(proc)
                    if proc.pid not in self.names:
                        self.names[proc.pid] = proc.name()
                except psutil.Error:
                    continue
                if want_pss:
                    total_pss += getattr(info, "pss", info.rss)
                tree_rss += info.rss
                self.peak_by_pid[proc.pid] = max(self.peak_by_pid.get(proc.pid, 0), info.rss)
            total_rss += tree_rss
            self.peak_by_root[name] = max(self.peak_by_root.get(name, 0), tree_rss)
        self.peak_rss = max(self.peak_rss, total_rss)
        if want_pss:
            self.peak_pss = max(self.peak_pss, total_pss)
        self.samples += 1

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join()
        self.sample()

    def cpu_seconds(self) -> float:
        """CPU seconds of the trees so far, read now."""
        return self.cpu()

    def __enter__(self) -> TreeSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def summary(self) -> dict[str, Any]:
        return {
            "peak_rss_bytes": self.peak_rss,
            "peak_pss_bytes": self.peak_pss,
            "samples": self.samples,
            "max_processes": self.max_procs,
            "peak_rss_by_root_bytes": self.peak_by_root,
            "peak_rss_by_pid_bytes": self.peak_by_pid,
            "names": self.names,
            "cpu_seconds": self.cpu.total(),
        }


class SubprocessSampler:
    """``TreeSampler``'s sampling of this process's tree, run in a helper process: a
    sampling thread in a driver takes its GIL from the engine it measures (~4 % of the
    driver's samples at 1,000 clients per round). RSS only; the tree is listed again
    every ``relist_s``. After the ``with`` block: ``peak_rss``, ``peak_root``."""

    def __init__(self, interval: float = 0.2, relist_s: float = 2.0) -> None:
        self.interval, self.relist_s = interval, relist_s
        self.peak_rss = self.peak_root = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._cpu = TreeCpu()

    def cpu_seconds(self) -> float:
        """CPU seconds of this process and what it started (not the sampler), read now."""
        return self._cpu()

    def __enter__(self) -> SubprocessSampler:
        fd, path = tempfile.mkstemp(prefix="rss-", suffix=".json")
        os.close(fd)
        self._out = Path(path)
        args = [str(os.getpid()), path, str(self.interval), str(self.relist_s)]
        self._proc = subprocess.Popen([sys.executable, __file__, *args])
        self._cpu = TreeCpu(exclude={self._proc.pid})
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.terminate()
        self._proc.wait(timeout=30)
        found = json.loads(self._out.read_text() or "{}")
        self._out.unlink(missing_ok=True)
        self.peak_rss = int(found.get("peak_rss_bytes", 0))
        self.peak_root = int(found.get("peak_root_bytes", 0))


def _sample_until_terminated(pid: int, out: Path, interval: float, relist_s: float) -> None:
    """The helper process: sample ``pid``'s tree (less this process) until SIGTERM or
    until ``pid`` ends, then write the peaks to ``out``."""
    tree = TreeSampler({"tree": pid}, interval, 0, relist_s, exclude={os.getpid()})
    signal.signal(signal.SIGTERM, lambda *_: tree.stop_event.set())
    while not tree.stop_event.is_set() and psutil.pid_exists(pid):
        tree.sample()
        tree.stop_event.wait(interval)
    peaks = {"peak_rss_bytes": tree.peak_rss, "peak_root_bytes": tree.peak_by_pid.get(pid, 0)}
    out.write_text(json.dumps(peaks))


if __name__ == "__main__":
    _sample_until_terminated(
        int(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    )
