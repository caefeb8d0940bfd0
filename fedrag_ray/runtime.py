"""Process-level set-up shared by the CLI, Ray workers and tests.

torch is imported only where it is used: the federated driver (Flower's server loop,
aggregation, checkpoints) never loads a model, and importing torch and transformers costs
~500 MiB of resident memory per process.
"""

from __future__ import annotations

import os
import random

import numpy as np


def configure_process(threads: int | None = None) -> None:
    """Quiet, offline-friendly defaults. ``threads`` caps torch's intra-op pool: one per
    Ray client slot, so N actors on N cores do not oversubscribe."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, int(threads)))


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
