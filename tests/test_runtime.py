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
