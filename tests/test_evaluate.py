"""Metrics on hand-worked examples, and ``evaluate`` against a recomputation by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedrag_ray.evaluate import (
    evaluate,
    exact_match,
    label_predictions,
    mean_reciprocal_rank,
    normalize_answer,
    option_reserve,
    recall_at_k,
    token_f1,
)


def test_normalize_and_exact_match():
    assert normalize_answer("  The  Cat, sat!  ") == "cat sat"
    assert normalize_answer("An apple a day") == "apple day"
    assert exact_match("The cat!", "cat") == 1.0
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("yes", "no") == 0.0
    assert exact_match("cats", "cat") == 0.0


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("the cat sat on the mat", "a cat sat on the hat", 0.75),  # 3 of 4 both ways
        ("a b b c", "b b d", 2 / 3),  # 'a' is an article; bag overlap {b, b}
        ("x y", "x y z w", 2 * 1.0 * 0.5 / 1.5),  # P=1, R=1/2
        ("b b b", "b", 2 * (1 / 3) * 1 / (4 / 3)),  # repeated tokens count once per match
        ("completely wrong", "right answer", 0.0),
        ("", "", 1.0),
        ("the", "answer", 0.0),  # prediction empty after normalisation
        ("Yes!", "yes", 1.0),
    ],
)
def test_token_f1(pred, ref, expected):
    assert token_f1(pred, ref) == pytest.approx(expected)


def test_recall_at_k_hand_examples():
    retrieved = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"], ["x"]]
    gold = [["b"], ["f", "zz"], ["nope"], []]  # the last has no gold and is skipped
    assert recall_at_k(retrieved, gold, 1) == pytest.approx(0 / 3)
    assert recall_at_k(retrieved, gold, 2) == pytest.approx(1 / 3)
    assert recall_at_k(retrieved, gold, 3) == pytest.approx(2 / 3)
    assert recall_at_k(retrieved, gold, 10) == pytest.approx(2 / 3)
    assert math.isnan(recall_at_k([["a"]], [[]], 1))


def test_mrr_hand_examples():
    retrieved = [["a", "b", "c"], ["d", "e", "f"], ["g", "h"], ["b", "b", "a"]]
    gold = [["c"], ["d", "f"], ["z"], ["a"]]
    # ranks: 3, 1 (first gold hit counts), none, 3
    assert mean_reciprocal_rank(retrieved, gold) == pytest.approx((1 / 3 + 1 + 0 + 1 / 3) / 4)
    assert mean_reciprocal_rank([["a"], ["b"]], [["a"], []]) == pytest.approx(1.0)
    assert math.isnan(mean_reciprocal_rank([["a"]], [[]]))


@pytest.fixture(scope="module")
def eval_system(retriever, generator, small_store):
    import copy

    from fedrag_ray.config import config_from_dict
    from fedrag_ray.rag import RAGSystem

    cfg = config_from_dict(
        {
            "generator": {"model": "tiny-random", "max_length": 64},
            "rag": {"top_k": 3, "max_new_tokens": 4},
            "eval": {"k_values": [1, 3, 10]},
        }
    )
    return RAGSystem(
        cfg,
        retriever=copy.deepcopy(retriever),
        generator=copy.deepcopy(generator),
        store=small_store,
    )


def test_evaluate_matches_hand_recomputation(eval_system, small_corpus, small_store):
    system = eval_system
    examples = small_corpus[0][:6]
    metrics = evaluate(system, examples, small_store)
    assert metrics["n"] == 6
    for key in ("recall@1", "recall@3", "recall@10", "mrr", "accuracy", "exact_match", "f1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    _, idx = system.retrieve([e.question for e in examples], 10)
    docs = [[small_store.passages[i].doc_id for i in row] for row in idx]
    for k in (1, 3, 10):
        hand = np.mean([e.id in d[:k] for e, d in zip(examples, docs, strict=True)])
        assert metrics[f"recall@{k}"] == pytest.approx(hand)
    ranks = [
        next((r + 1 for r, d in enumerate(row) if d == e.id), None)
        for e, row in zip(examples, docs, strict=True)
    ]
    assert metrics["mrr"] == pytest.approx(np.mean([1 / r if r else 0 for r in ranks]))
    # MiniLM finds a question's own abstract among 40 most of the time
    assert metrics["recall@3"] >= 0.5
    assert metrics["recall@1"] <= metrics["recall@3"] <= metrics["recall@10"]
    assert metrics["eval_seconds"] > 0


def test_label_predictions_is_the_replug_mixture(eval_system, small_corpus, small_store):
    """argmax_o log sum_d softmax(s/tau)_d P_LM(o | d, q), recomputed with torch."""
    system = eval_system
    examples = small_corpus[0][:3]
    options = system.cfg.rag.label_options
    questions = [e.question for e in examples]
    scores, idx = system.retrieve(questions, 3)
    ctx = [[small_store.passages[i].text for i in row] for row in idx]
    w = torch.softmax(torch.from_numpy(scores) / system.cfg.train.lsr.tau, dim=-1)
    reserve = option_reserve(system, options)
    expected = []
    with torch.no_grad():
        for qi, q in enumerate(questions):
            mix = []
            for o in options:
                lp, _ = system.generator.answer_logprobs(
                    [system.prompt(q, c, reserve) for c in ctx[qi]], [o] * 3
                )
                mix.append(torch.logsumexp(torch.log(w[qi]) + lp, 0))
            expected.append(options[int(torch.stack(mix).argmax())])
    got = label_predictions(system, questions, ctx, w.numpy(), options)
    assert got == expected
    # closed book: one empty passage
    closed = label_predictions(system, questions, None, None, options)
    with torch.no_grad():
        for q, pred in zip(questions, closed, strict=True):
            lp, _ = system.generator.answer_logprobs([system.prompt(q, "", reserve)] * 3, options)
            assert pred == options[int(lp.argmax())]


def test_retrieval_weights_drop_ann_misses():
    from fedrag_ray.evaluate import retrieval_weights

    scores = np.array([[0.9, 0.5, -3.4e38], [0.2, 0.1, 0.0]], dtype=np.float32)
    idx = np.array([[4, 7, -1], [1, 2, 3]])
    w = retrieval_weights(scores, idx, tau=0.1)
    assert [len(x) for x in w] == [2, 3]  # aligned with the passages actually used
    expected = np.exp(np.array([9.0, 5.0]) - 9.0)
    np.testing.assert_allclose(w[0], expected / expected.sum(), rtol=1e-6)
    assert all(np.isclose(x.sum(), 1.0) for x in w)


def test_context_policy_cuts_the_lowest_ranked_passage_first(eval_system):
    """Passages in rank order fill the budget; the one that overflows is cut and the
    lower-ranked ones dropped; the question is never cut. ``ask`` uses the same policy."""
    system = eval_system
    gen = system.generator
    top, second, third = (
        " ".join(f"{w}{i}" for i in range(n)) for w, n in (("alpha", 8), ("beta", 60), ("gamma", 8))
    )
    question = "what does the top passage say?"
    kept = system.fit_passages(question, [top, second, third], reserve=4)
    assert kept[0] == top  # the best passage survives whole
    assert len(kept) == 2 and second.startswith(kept[1]) and len(kept[1]) < len(second)
    prompt = system.prompt(question, [top, second, third], reserve=4)
    assert question in prompt and "gamma" not in prompt
    assert len(gen.encode_prompt(prompt)) + 4 <= system.cfg.generator.max_length
    # everything fits: nothing is cut
    assert system.fit_passages(question, [top, third], reserve=4) == [top, third]


def test_answer_keeps_top_ranked_passages_within_the_budget(eval_system, small_store):
    """``RAGSystem.answer`` (the ``ask`` command) uses the same policy: with room for less
    than three abstracts' sections, the top-ranked one is kept (cut) and the rest dropped,
    and the sources it returns are the passages that were in the prompt."""
    from fedrag_ray.config import apply_overrides, config_from_dict
    from fedrag_ray.rag import RAGSystem

    raw = apply_overrides(eval_system.cfg.model_dump(mode="json"), {"rag.generate_passages": 3})
    system = RAGSystem(
        config_from_dict(raw),
        retriever=eval_system.retriever,
        generator=eval_system.generator,
        store=small_store,
    )
    question = "Is there a role for leukocyte and CRP measurements in appendicitis?"
    _, idx = system.retrieve([question], 3)
    ranked = [small_store.passages[i] for i in idx[0]]
    ans = system.answer(question)
    assert ans.passages and ans.passages == ranked[: len(ans.passages)]
    assert len(ans.passages) < 3  # 64 tokens hold less than three sections
    assert len(ans.scores) == len(ans.passages)
    wide = RAGSystem(
        config_from_dict(apply_overrides(raw, {"generator.max_length": 1024})),
        retriever=eval_system.retriever,
        generator=eval_system.generator,
        store=small_store,
    )
    assert wide.fit_passages(question, [p.text for p in ranked], 4) == [p.text for p in ranked]
