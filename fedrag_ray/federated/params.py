"""What crosses the wire: named float32 arrays of the trainable parameters only."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    """bf16/fp16 tensors are cast to float32 before this (NumPy has no bfloat16)."""
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()}
    )


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of the arrays (what a real transport must move at minimum)."""
    return int(sum(len(a.data) for a in record.values()))
