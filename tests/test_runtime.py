"""Process-level helpers (``fedrag_ray.runtime``)."""

from __future__ import annotations

import subprocess
import sys


def test_release_free_memory_returns_freed_heap_pages_to_the_os():
    """Freed small allocations stay in glibc's heap (RSS does not fall) until
    ``release_free_memory`` trims it; run in a fresh interpreter so no other test's heap
    state matters."""
    code = """
import psutil
from fedrag_ray.runtime import release_free_memory
rss = lambda: psutil.Process().memory_info().rss
chunks = [bytearray(32 * 1024) for _ in range(8000)]  # ~256 MB in heap-sized blocks
keep = chunks[-1]
del chunks[:-1]
before = rss()
assert release_free_memory()
print(before - rss())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) > 150 * 2**20, out.stdout


def test_drop_file_pages_releases_a_mapped_tensor_and_keeps_its_bytes(tmp_path):
    """A float32 tensor loaded copy-on-write from a file (as torch maps safetensors)
    holds its pages in RSS once read; ``drop_file_pages`` takes them out, a later read
    gives the file's bytes again, and a range outside every file map is left alone."""
    code = f"""
import numpy as np, psutil, torch
from fedrag_ray.runtime import drop_file_pages, file_mappings
path = {str(tmp_path / "w.bin")!r}
n = 64 * 2**20 // 4
np.arange(n, dtype=np.float32).tofile(path)
t = torch.from_file(path, shared=False, size=n, dtype=torch.float32)
maps = file_mappings(".bin")
assert any(a <= t.data_ptr() < b for a, b in maps), maps
total = float(t.sum())  # touch every page
before = psutil.Process().memory_info().rss
assert drop_file_pages(t.data_ptr(), t.nbytes, maps)
freed = before - psutil.Process().memory_info().rss
assert float(t.sum()) == total  # faulted back in from the file
anon = torch.zeros(1024)
assert not drop_file_pages(anon.data_ptr(), anon.nbytes, maps)
print(freed)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > 60 * 2**20, out.stdout
