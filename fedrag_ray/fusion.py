"""Merging ranked passage lists from several searchers (federated retrieval).

Every client returns its own top-k; the server needs one list. ``score`` merging sorts
all hits by their inner-product score (comparable when every client's index was built by
the same encoder, as here); reciprocal-rank fusion (Cormack et al. 2009) scores a passage
by sum over lists of 1 / (rrf_k + rank), rank starting at 1, so it needs no comparable
scores and rewards passages several lists agree on. A passage returned by several lists
(the public store every client also searches) appears once in the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedrag_ray.data import Passage

RRF_K = 60


def merge_top_k(
    scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (nq, k_i) results into one top-k per query: highest score first,
    ties by lower id (the order FAISS keeps), missing hits (-1) last."""
    s = np.concatenate(scores, axis=1).astype(np.float32)
    i = np.concatenate(ids, axis=1).astype(np.int64)
    key = np.where(i >= 0, -s.astype(np.float64), np.inf)
    order = np.lexsort((i, key), axis=1)[:, :k]
    top_s, top_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    missing = top_i < 0
    top_s[missing], top_i[missing] = -np.finfo(np.float32).max, -1
    return top_s, top_i


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float  # the searcher's score, or the fused score after rrf
    source: int  # which list (client partition) it came from; the first one for rrf


def merge_by_score(lists: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """Top-k over all lists by score; ties keep list order, then rank order."""
    best: dict[str, Hit] = {}
    order: dict[str, tuple[int, int]] = {}
    for li, hits in enumerate(lists):
        for rank, hit in enumerate(hits):
            pid = hit.passage.id
            if pid not in best or hit.score > best[pid].score:
                best[pid] = hit
                order.setdefault(pid, (li, rank))
    ranked = sorted(best, key=lambda pid: (-best[pid].score, order[pid]))
    return [best[pid] for pid in ranked[:k]]


def reciprocal_rank_fusion(lists: Sequence[Sequence[Hit]], k: int, rrf_k: int = RRF_K) -> list[Hit]:
    """Top-k by sum over lists of 1 / (rrf_k + rank); ties by the best rank a passage
    reached, then by the first list that returned it."""
    fused: dict[str, float] = {}
    first: dict[str, Hit] = {}
    best_rank: dict[str, tuple[int, int]] = {}
    for li, hits in enumerate(lists):
        for rank, hit in enumerate(hits, start=1):
            pid = hit.passage.id
            fused[pid] = fused.get(pid, 0.0) + 1.0 / (rrf_k + rank)
            first.setdefault(pid, hit)
            best_rank[pid] = min(best_rank.get(pid, (rank, li)), (rank, li))
    ranked = sorted(fused, key=lambda pid: (-fused[pid], best_rank[pid]))
    return [Hit(first[pid].passage, fused[pid], first[pid].source) for pid in ranked[:k]]


def merge(
    lists: Sequence[Sequence[Hit]], k: int, how: str = "rrf", rrf_k: int = RRF_K
) -> list[Hit]:
    if how == "score":
        return merge_by_score(lists, k)
    if how == "rrf":
        return reciprocal_rank_fusion(lists, k, rrf_k)
    raise ValueError(f"federation.retrieval.merge must be score or rrf, got {how!r}")
