"""Merging clients' ranked lists: score merge and reciprocal-rank fusion, checked by hand."""

from __future__ import annotations

import pytest

from fedrag_ray.data import Passage
from fedrag_ray.fusion import Hit, merge, merge_by_score, reciprocal_rank_fusion


def _list(source: int, *pairs: tuple[str, float]) -> list[Hit]:
    return [Hit(Passage(id=p, text=p, doc_id=p), s, source) for p, s in pairs]


A = _list(0, ("a", 0.9), ("b", 0.8), ("c", 0.7))
B = _list(1, ("c", 0.95), ("d", 0.6), ("a", 0.5))
C = _list(2, ("e", 0.85), ("c", 0.4))


def test_rrf_order_by_hand():
    # rrf_k = 60, ranks from 1:
    #   a: 1/61 (A, rank 1) + 1/63 (B, rank 3) = 0.032266
    #   b: 1/62                                 = 0.016129
    #   c: 1/63 (A) + 1/61 (B) + 1/62 (C)       = 0.048395
    #   d: 1/62                                 = 0.016129
    #   e: 1/61                                 = 0.016393
    # c > a > e > b = d; b and d tie on score and best rank (2), b's list (A) is first.
    fused = reciprocal_rank_fusion([A, B, C], k=5)
    assert [h.passage.id for h in fused] == ["c", "a", "e", "b", "d"]
    assert fused[0].score == pytest.approx(1 / 63 + 1 / 61 + 1 / 62)
    assert fused[1].score == pytest.approx(1 / 61 + 1 / 63)
    assert [h.source for h in fused] == [0, 0, 2, 0, 1]  # the first list that returned it


def test_rrf_constant_changes_the_order():
    # d is first in one list; e is fourth in two lists.
    #   rrf_k = 1:  d = 1/2 = 0.5,      e = 2/5  = 0.4     -> d first
    #   rrf_k = 60: d = 1/61 = 0.0164,  e = 2/64 = 0.03125 -> e first (agreement wins)
    fill = [(f"f{i}", 1.0) for i in range(3)]
    lists = [
        _list(0, ("d", 1.0)),
        _list(1, *fill, ("e", 0.5)),
        _list(2, *[(f"g{i}", 1.0) for i in range(3)], ("e", 0.5)),
    ]
    assert reciprocal_rank_fusion(lists, 1, rrf_k=1)[0].passage.id == "d"
    assert reciprocal_rank_fusion(lists, 1, rrf_k=60)[0].passage.id == "e"


def test_score_merge_dedupes_and_keeps_best_score():
    merged = merge_by_score([A, B, C], k=4)
    assert [(h.passage.id, h.score, h.source) for h in merged] == [
        ("c", 0.95, 1),
        ("a", 0.9, 0),
        ("e", 0.85, 2),
        ("b", 0.8, 0),
    ]


def test_one_list_merges_to_itself():
    assert [h.passage.id for h in merge([A], 3, "rrf")] == ["a", "b", "c"]
    assert merge([A], 3, "score") == A
    with pytest.raises(ValueError, match="score or rrf"):
        merge([A], 3, "vote")
