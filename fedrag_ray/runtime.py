"""Process-level set-up shared by the CLI, Ray workers and tests.

torch is imported only where it is used: the federated driver (Flower's server loop,
aggregation, checkpoints) never loads a model, and importing torch and transformers costs
~500 MiB of resident memory per process.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

VERBOSE_ENV = "FEDRAG_RAY_VERBOSE"  # forwarded to Ray actors with the other FEDRAG_RAY_*


def env_flag(name: str) -> bool:
    """A FEDRAG_RAY_* switch: on unless unset, empty, ``0`` or ``false``."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false")


def verbose() -> bool:
    return env_flag(VERBOSE_ENV)


def quiet_env() -> dict[str, str]:
    """Environment for processes this one starts (Ray workers): library deprecation
    notices and per-load progress bars off unless ``--verbose``. Set at interpreter start
    (PYTHONWARNINGS) because most of them fire while modules are imported."""
    if verbose():
        return {}
    return {
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        # tqdm reads it when imported: the one bar the switches above miss is the GGUF
        # converter's per-tensor bar (plain tqdm) on a fresh machine's first run.
        "TQDM_DISABLE": "1",
    }


def quiet_this_process(warning_filters: bool = True) -> None:
    """The environment switches and (``warning_filters``) warning filters of
    :func:`configure_process`, without importing anything: the CLI calls it first, since
    tqdm, huggingface_hub and transformers read their switches once, when first imported."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not verbose():
        for key, value in quiet_env().items():
            os.environ.setdefault(key, value)
        if warning_filters:
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)


def configure_process(threads: int | None = None, own_process: bool = True) -> None:
    """Quiet, offline-friendly defaults. ``threads`` caps torch's intra-op pool: one per
    Ray client slot, so N actors on N cores do not oversubscribe. Without ``--verbose``
    (FEDRAG_RAY_VERBOSE) the libraries' deprecation notices and per-load progress bars
    (one "Loading weights" bar per actor and model) stay off the console.
    ``own_process``: a process fedrag_ray owns (a Ray actor, a trial, the CLI) also gets
    process-wide warning filters; a caller's process (a run started from a notebook or a
    test) does not: there the run scopes them itself (:func:`quiet_warnings`)."""
    quiet_this_process(warning_filters=own_process)
    if not verbose():
        logging.getLogger("flwr").setLevel(logging.ERROR)
        try:
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
        except ImportError:  # the driver may not have it imported; nothing to quiet
            pass
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """The libraries' deprecation notices off for a block (unless ``--verbose``), the
    caller's warning filters back afterwards."""
    with warnings.catch_warnings():
        if not verbose():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
        yield


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's global RNGs seeded for a block (a run whose libraries
    draw from them), and each put back as it was afterwards: seeding is the run's
    business, not a process-wide side effect of calling it."""
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def torch_seeded(seed: int) -> Iterator[None]:
    """torch's global RNG seeded for a block (LoRA's random init, dropout: code that
    takes no generator), and restored afterwards (CUDA's too)."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """The C library, looked up once (``find_library`` runs a subprocess), or None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``); False where
    there is no glibc. After a phase that allocated and freed a lot (index build, an
    evaluation, a local training) glibc keeps the freed pages in its arenas, and an
    actor's resident memory would stay at that phase's high-water mark for the rest of
    the run: measured on an LSR actor with SmolLM2, 1.22 -> 1.02 GB after the first
    evaluation (``benchmarks/peer_fedrag.py`` sums the actors' RSS)."""
    trim = getattr(_libc(), "malloc_trim", None)  # None: musl, macOS
    if trim is None:
        return False
    trim(0)
    return True


_MADV_DONTNEED = 4  # Linux


def file_mappings(suffix: str) -> list[tuple[int, int]]:
    """[start, end) address ranges of this process's memory maps of files ending in
    ``suffix`` (Linux ``/proc/self/maps``; empty elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith(suffix):
            start, end = parts[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def drop_file_pages(address: int, nbytes: int, mappings: list[tuple[int, int]]) -> bool:
    """Take the whole pages of [address, address + nbytes) out of this process's RSS
    (``madvise(MADV_DONTNEED)``), only where the range lies inside one of ``mappings``
    (file maps from ``file_mappings``). A later read faults the *file's* bytes back in, so
    in a private map (torch maps safetensors copy-on-write) it is only for bytes nothing
    reads any more: a loaded float32 weight just replaced by its bf16 copy, whose pages
    would otherwise stay resident until the whole file's map is released, so casting a
    model would briefly hold both copies."""
    libc = _libc()
    madvise = getattr(libc, "madvise", None)
    if madvise is None or not any(s <= address and address + nbytes <= e for s, e in mappings):
        return False
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-address // page) * page  # inward: never a page shared with a neighbour
    end = (address + nbytes) // page * page
    if end <= start:
        return False
    return madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) == 0
