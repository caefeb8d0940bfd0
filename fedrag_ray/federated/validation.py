"""Checks on what a client sends back, before anything is aggregated.

A reply that names different arrays than the global model, has another shape, carries
NaN/inf or an update (reply minus global) whose L2 norm is above
``federation.validation.max_update_norm`` is dropped for that round; the reason, with
the partition and the array, goes into the round's ``failure_reasons``. The strategy
never sees it, so one broken or hostile client cannot crash the round or poison the
global model. :func:`check_arrays` is also applied to the aggregate itself (the last
guard: a secure aggregate cannot be checked client by client).
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message

from fedrag_ray.federated.params import to_numpy
from fedrag_ray.federated.protocol import ARRAYS_KEY, METRICS_KEY, PARTITION_KEY, WEIGHT_KEY


class InvalidUpdate(ValueError):
    """A reply that must not be aggregated; the message is the reason."""


def check_arrays(
    arrays: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    max_update_norm: float | None = None,
) -> float:
    """Raise :class:`InvalidUpdate` naming the first problem; else the update's L2 norm."""
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing or extra:
        raise InvalidUpdate(f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})")
    sq = 0.0
    for name, ref in reference.items():
        a = arrays[name]
        if a.shape != ref.shape:
            raise InvalidUpdate(f"wrong shape for {name}: {a.shape}, expected {ref.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise InvalidUpdate(f"non-float dtype {a.dtype} for {name}")
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise InvalidUpdate(f"{bad} non-finite values (NaN/inf) in {name}")
        sq += float(np.sum(np.square(a.astype(np.float64) - ref.astype(np.float64))))
    norm = math.sqrt(sq)
    if max_update_norm is not None and not norm <= max_update_norm:
        raise InvalidUpdate(f"update norm {norm:.4g} above the bound {max_update_norm:g}")
    return norm


def check_reply(
    reply: Message, reference: dict[str, np.ndarray], max_update_norm: float | None = None
) -> float:
    """Validate one train reply against the global arrays it was trained from."""
    content = reply.content
    record = content[ARRAYS_KEY] if ARRAYS_KEY in content else None
    if not isinstance(record, ArrayRecord):
        raise InvalidUpdate(f"no ArrayRecord {ARRAYS_KEY!r} in the reply")
    metrics = content[METRICS_KEY] if METRICS_KEY in content else {}
    weight = metrics.get(WEIGHT_KEY) if hasattr(metrics, "get") else None
    if not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        raise InvalidUpdate(f"{WEIGHT_KEY} must be a positive finite number, got {weight!r}")
    try:
        arrays = {k: to_numpy(a) for k, a in record.items()}
    except Exception as err:  # undecodable bytes
        raise InvalidUpdate(f"arrays cannot be decoded: {err}") from None
    return check_arrays(arrays, reference, max_update_norm)


def partition_of(reply: Message) -> int | str:
    try:
        return int(reply.content[METRICS_KEY][PARTITION_KEY])
    except Exception:
        return f"node {reply.metadata.src_node_id}"


def split_valid(
    replies: list[Message],
    reference: dict[str, np.ndarray],
    max_update_norm: float | None = None,
) -> tuple[list[Message], list[str], dict[int | str, float]]:
    """(accepted replies, reasons for the rejected ones, update norm per partition)."""
    ok, reasons, norms = [], [], {}
    for reply in replies:
        pid = partition_of(reply)
        try:
            norms[pid] = check_reply(reply, reference, max_update_norm)
        except InvalidUpdate as err:
            reasons.append(f"rejected partition {pid}: {err}")
            continue
        ok.append(reply)
    return ok, reasons, norms
