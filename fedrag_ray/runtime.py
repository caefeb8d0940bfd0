"""Process-level set-up shared by the CLI, Ray workers and tests.

torch is imported only where it is used: the federated driver (Flower's server loop,
aggregation, checkpoints) never loads a model, and importing torch and transformers costs
~500 MiB of resident memory per process.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import warnings
from collections.abc import Callable

import numpy as np

VERBOSE_ENV = "FEDRAG_RAY_VERBOSE"  # forwarded to Ray actors with the other FEDRAG_RAY_*


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


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


def configure_process(threads: int | None = None) -> None:
    """Quiet, offline-friendly defaults. ``threads`` caps torch's intra-op pool: one per
    Ray client slot, so N actors on N cores do not oversubscribe. Without ``--verbose``
    (FEDRAG_RAY_VERBOSE) the libraries' deprecation notices and per-load progress bars
    (one "Loading weights" bar per actor and model) stay off the console."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not verbose():
        for key, value in quiet_env().items():
            os.environ.setdefault(key, value)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
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


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs a subprocess), or
    None where there is no glibc (musl, macOS)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``); False where
    there is no glibc. After a phase that allocated and freed a lot (index build, an
    evaluation, a local training) glibc keeps the freed pages in its arenas, and an
    actor's resident memory would stay at that phase's high-water mark for the rest of
    the run: measured on an LSR actor with SmolLM2, 1.22 -> 1.02 GB after the first
    evaluation (``benchmarks/peer_fedrag.py`` sums the actors' RSS)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
