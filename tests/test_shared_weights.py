"""Frozen weights mapped from one file per node (fedrag_ray.shared_weights): same values,
memory shared between processes, files reused only for the bytes they hold."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fedrag_ray.shared_weights import share_frozen_weights


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(
        torch.nn.Embedding(64, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 64)
    )
    m[2].weight = m[0].weight  # tied, as an LM head with its embeddings
    m[1].to(torch.bfloat16)  # a compacted layer
    for p in m.parameters():
        p.requires_grad_(False)
    m[1].bias.requires_grad_(True)  # trainable: stays private
    return m


def _mapped_files(t: torch.Tensor) -> set[str]:
    """Files whose map in this process holds ``t``'s first byte."""
    ptr, out = t.data_ptr(), set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= ptr < hi and len(parts) == 6:
            out.add(parts[5])
    return out


def test_frozen_parameters_map_the_file_and_keep_their_values(tmp_path):
    m, ref = _model(0), _model(0)
    x = torch.tensor([[1, 5, 7]])
    path = share_frozen_weights(m, tmp_path)
    assert path is not None and path.parent == tmp_path
    for p in (m[0].weight, m[1].weight, m[2].bias):
        assert _mapped_files(p) == {str(path)}
    assert m[2].weight is m[0].weight  # still tied
    assert str(path) not in _mapped_files(m[1].bias)  # trainable: untouched
    for a, b in zip(m.parameters(), ref.parameters(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with torch.no_grad():
        h = m[0](x)
        h = m[1](h.to(torch.bfloat16)).float()
        h2 = ref[1](ref[0](x).to(torch.bfloat16)).float()
    assert torch.equal(h, h2)


def test_the_same_weights_reuse_the_file_and_other_weights_get_their_own(tmp_path):
    first = share_frozen_weights(_model(0), tmp_path)
    stat = first.stat()
    again = share_frozen_weights(_model(0), tmp_path)
    assert again == first and again.stat().st_mtime_ns == stat.st_mtime_ns  # not rewritten
    other = share_frozen_weights(_model(1), tmp_path)
    assert other != first
    changed = _model(0)
    changed[1].weight.data[0, 0] += 1  # one element differs: never the old file
    assert share_frozen_weights(changed, tmp_path) not in (first, other)


def test_a_damaged_file_is_rewritten_and_writes_stay_private(tmp_path):
    path = share_frozen_weights(_model(0), tmp_path)
    path.write_bytes(path.read_bytes()[:100])  # truncated by someone else
    m = _model(0)
    assert share_frozen_weights(m, tmp_path) == path
    assert all(
        torch.equal(a, b) for a, b in zip(m.parameters(), _model(0).parameters(), strict=True)
    )
    with torch.no_grad():
        m[0].weight.add_(1.0)  # e.g. merging LoRA for export: copy-on-write
    fresh = _model(0)
    share_frozen_weights(fresh, tmp_path)
    assert torch.equal(fresh[0].weight, _model(0)[0].weight)


def test_nothing_to_share_writes_nothing(tmp_path):
    m = torch.nn.Linear(4, 4)  # all trainable
    assert share_frozen_weights(m, tmp_path) is None
    assert not any(tmp_path.iterdir())


def _pss_rss_kib(pid: int, path: Path) -> tuple[int, int]:
    """(Pss, Rss) in KiB of process ``pid``'s maps of ``path``."""
    pss = rss = 0
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = line.rstrip().endswith(str(path))
        elif inside and head[0] == "Pss:":
            pss += int(head[1])
        elif inside and head[0] == "Rss:":
            rss += int(head[1])
    return pss, rss


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc smaps")
def test_two_processes_share_one_copy(tmp_path):
    """The point of it: a second process mapping the file halves each one's share (PSS)."""
    script = textwrap.dedent(
        f"""
        import sys, torch
        torch.manual_seed(0)
        m = torch.nn.Linear(1024, 1024)  # 4 MiB of frozen float32
        m.requires_grad_(False)
        from fedrag_ray.shared_weights import share_frozen_weights
        path = share_frozen_weights(m, {str(tmp_path)!r})
        print(path, float(m.weight.sum()), flush=True)  # reads every page
        sys.stdin.read()
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    try:
        lines = [p.stdout.readline().split() for p in procs]
        assert lines[0] == lines[1], lines  # same file, same values
        path = Path(lines[0][0])
        pss, rss = _pss_rss_kib(procs[0].pid, path)
        assert rss >= 4096  # the whole weight is resident ...
        assert pss <= rss * 0.6  # ... and counted half in each process
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)
