"""What crosses the wire: named float32 arrays of the trainable parameters only."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


class WireArray(Array):
    """Flower's ``Array`` (same bytes, same semantics) whose ``numpy()`` is
    :func:`to_numpy`: the strategies call ``numpy()`` on every reply's every array when
    they aggregate, and ``np.load``'s header parsing made that the largest sequential
    part of a round at 1,000 replies. Records built by :func:`to_record` carry these (the
    class travels with the pickled message); arrays built elsewhere stay plain ``Array``
    and decode through Flower."""

    def numpy(self) -> np.ndarray:
        return to_numpy(self)


def to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    """bf16/fp16 tensors are cast to float32 before this (NumPy has no bfloat16). Items
    are set one by one: ``ArrayRecord(dict)`` would rebuild them as plain ``Array``."""
    record = ArrayRecord()
    for k, v in state.items():
        record[k] = WireArray(np.ascontiguousarray(v, dtype=np.float32))
    return record


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: to_numpy(a) for k, a in record.items()}


def to_numpy(array: Array) -> np.ndarray:
    """``Array.numpy()`` without ``np.load``: the payload of a C-ordered .npy buffer is
    its last ``nbytes`` bytes, so the header (which ``np.load`` parses with
    ``ast.literal_eval``, ~0.15 ms per array: at 1,000 replies of 16 arrays, seconds per
    round on the driver) needs no parsing. Anything else goes through Flower."""
    dtype = np.dtype(array.dtype)
    nbytes = int(np.prod(array.shape, dtype=np.int64)) * dtype.itemsize
    data = array.data
    head = data[: len(data) - nbytes]
    if (
        dtype.hasobject
        or not head.startswith(b"\x93NUMPY")
        or b"'fortran_order': False" not in head
    ):
        return Array.numpy(array)
    return np.frombuffer(data, dtype=dtype, offset=len(head)).reshape(array.shape).copy()


def record_nbytes(record: ArrayRecord) -> int:
    """Payload bytes of the arrays (what a real transport must move at minimum)."""
    return int(sum(len(a.data) for a in record.values()))
