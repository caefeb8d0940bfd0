"""Progress callbacks (``fedrag_ray.progress``): every long phase reports batches as they
finish, counts up to its total, and the results do not depend on being watched."""

from __future__ import annotations

import copy

import pytest

from fedrag_ray.evaluate import evaluate


@pytest.fixture(scope="module")
def system(retriever, generator, small_store):
    from fedrag_ray.config import config_from_dict
    from fedrag_ray.rag import RAGSystem

    cfg = config_from_dict(
        {
            "generator": {"model": "tiny-random", "max_length": 64},
            "rag": {"top_k": 3, "max_new_tokens": 4},
        }
    )
    return RAGSystem(
        cfg,
        retriever=copy.deepcopy(retriever),
        generator=copy.deepcopy(generator),
        store=small_store,
    )


def _stages(calls: list[tuple[str, int, int]]) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for stage, done, total in calls:
        out.setdefault(stage, []).append((done, total))
    return out


def _counts_up_to_total(seen: list[tuple[int, int]]) -> None:
    done = [d for d, _ in seen]
    assert done[0] == 0 and done == sorted(done), done
    assert len({t for _, t in seen}) == 1
    assert done[-1] == seen[-1][1]


def test_evaluate_reports_each_phase_and_gives_the_same_metrics(system, small_corpus):
    examples = small_corpus[0][:20]
    calls: list[tuple[str, int, int]] = []
    watched = evaluate(system, examples, progress=lambda *c: calls.append(c))
    unwatched = evaluate(system, examples)
    for key in ("recall@1", "mrr", "accuracy", "exact_match", "f1", "closed_book_accuracy"):
        assert watched[key] == unwatched[key], key
    stages = _stages(calls)
    assert set(stages) == {
        "scoring labels",
        "generating answers",
        "closed-book scoring labels",
        "closed-book generating answers",
    }
    for seen in stages.values():
        _counts_up_to_total(seen)
    # one prompt per (question, passage) with passages, one per question without
    assert stages["scoring labels"][-1][1] == 3 * len(examples)
    assert stages["closed-book scoring labels"][-1][1] == len(examples)
    assert stages["generating answers"][-1][1] == len(examples)
    # 20 generations in batches of 16: the count moves before the phase ends
    assert [d for d, _ in stages["generating answers"]] == [0, 16, 20]


def test_build_store_reports_embedded_passages(system, small_corpus):
    _, passages = small_corpus
    calls: list[tuple[str, int, int]] = []
    sys2 = copy.copy(system)
    store = sys2.build_store(passages, lambda *c: calls.append(c))
    stages = _stages(calls)
    assert list(stages) == ["embedding passages"]
    _counts_up_to_total(stages["embedding passages"])
    assert stages["embedding passages"][-1][1] == len(passages) == len(store)
    batch = system.retriever.cfg.batch_size
    assert len(stages["embedding passages"]) == 1 + -(-len(passages) // batch)
