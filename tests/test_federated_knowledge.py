"""Knowledge at scale inside real federated runs (Flower's Ray backend, real actors):
the global index served by shard actors gives the same evaluation as a local copy, and
federated retrieval merges the clients' private top-k lists."""

from __future__ import annotations

import numpy as np
import pytest
from shared_data import write_pubmedqa_items

from fedrag_ray.config import apply_overrides, config_from_dict


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """40 PubMedQA items (~135 passages): small enough to embed in seconds per run."""

    return write_pubmedqa_items(tmp_path_factory.mktemp("data") / "pubmedqa_40.json", 40)


def tiny(data_path, **overrides):
    raw = {
        "name": "tiny",
        "data": {"path": str(data_path), "max_train": 16, "max_eval": 4},
        "eval": {"generate": False, "closed_book": False},
        "generator": {"model": "tiny-random", "max_length": 96},
        "train": {"method": "ralt", "batch_size": 2, "ralt": {"k": 2}},
        # one client actor: see test_federated.tiny
        "federation": {"num_clients": 2, "rounds": 1, "local_steps": 1, "num_actors": 1},
    }
    return config_from_dict(apply_overrides(raw, overrides))


@pytest.mark.timeout(900)
def test_served_global_index_evaluates_like_a_local_copy(tmp_path, tiny_data):
    """Both runs share one global store (``knowledge_store.path``, as concurrent Tune
    trials do), and the served run starts while another service (``ask``'s) serves that
    store in the same Ray: its shard actors are the run's own, not a name collision."""
    from fedrag_ray import index_service
    from fedrag_ray.federated import run_federated

    shared = {"knowledge_store.n_shards": 3, "knowledge_store.path": str(tmp_path / "global")}
    local = run_federated(tiny(tiny_data, **shared), tmp_path / "local", num_cpus=2)
    assert local["shard_actors"] == []
    with index_service.serving(tmp_path / "global") as other:
        served = run_federated(
            tiny(tiny_data, **shared, **{"knowledge_store.serve": "actors"}),
            tmp_path / "served",
            num_cpus=2,
        )
        # the other service was left alone: still up and answering
        assert other.search(np.ones((1, other.dim), dtype=np.float32), 1)[1].shape == (1, 1)
    assert [s["shard"] for s in served["shard_actors"]] == [0, 1, 2]
    assert served["store_root_nodes_checked"] == 1
    assert served["failures"] == 0
    for key in ("recall@1", "recall@5", "mrr", "accuracy"):
        assert served["history"][0][key] == local["history"][0][key], key
        assert served["history"][-1][key] == local["history"][-1][key], key


@pytest.mark.timeout(900)
def test_federated_ask_with_one_client_is_that_clients_own_search(tmp_path, tiny_data, retriever):
    """One client: the merged list is its own top-k (ids in order; rrf scores 1/(60+r)),
    its scores are those of searching its shard here, and an answer is generated."""
    import numpy as np

    from fedrag_ray.data import load_dataset_from_config
    from fedrag_ray.federated.federated_retrieval import ask_inference, run_federated_retrieval
    from fedrag_ray.knowledge_store import KnowledgeStore

    cfg = tiny(
        tiny_data,
        **{"federation.num_clients": 1, "federation.knowledge": "private"},
    )
    questions = [e.question for e in load_dataset_from_config(cfg.data).eval[:3]]
    res = run_federated_retrieval(cfg, ask_inference(questions, 4, None), tmp_path, num_cpus=2)
    fr = res["federated_retrieval"]
    assert fr["clients"] == [0] and fr["failed"] == []

    shard = KnowledgeStore.load(tmp_path / "stores" / "clients" / "client_00000")
    scores, idx = shard.search(retriever.encode_queries(questions), 4)
    own = [[p.id for p in row] for row in shard.get(idx)]
    assert [[h["id"] for h in row] for row in fr["merged"]] == own
    per_client = fr["per_client"][0]
    assert [[h["id"] for h in row] for row in per_client] == own
    np.testing.assert_allclose([[h["score"] for h in row] for row in per_client], scores, atol=1e-5)
    np.testing.assert_allclose(
        [[h["score"] for h in row] for row in fr["merged"]], [[1 / 61, 1 / 62, 1 / 63, 1 / 64]] * 3
    )
    assert len(fr["answers"]) == 3 and all(isinstance(a["answer"], str) for a in fr["answers"])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("serve", ["local", "actors"])
def test_federated_eval_score_merge_equals_central(tmp_path, tiny_data, serve):
    """knowledge both, exact indexes: each client searches the public store and its own
    shard; merging the clients' lists by score is central retrieval over the same corpus
    (every passage is public or owned by one client)."""
    from fedrag_ray.data import load_dataset_from_config
    from fedrag_ray.federated.federated_retrieval import eval_inference, run_federated_retrieval

    cfg = tiny(
        tiny_data,
        **{
            "federation.num_clients": 3,
            "federation.knowledge": "both",
            "federation.retrieval.merge": "score",
            "knowledge_store.serve": serve,
            "knowledge_store.n_shards": 2,
        },
    )
    held = load_dataset_from_config(cfg.data).eval
    hook = eval_inference([e.question for e in held], [e.gold_doc_ids for e in held], [1, 5])
    res = run_federated_retrieval(cfg, hook, tmp_path, num_cpus=2)
    m = res["federated_eval"]
    assert m["clients"] == 3 and m["failed"] == []
    assert m["overlap_with_central@5"] == 1.0
    assert [[h["id"] for h in row] for row in res["federated_merged"]] == [
        [h["id"] for h in row] for row in res["central"]
    ]
    assert m["federated_recall@5"] == m["central_recall@5"]
    # not copied: the shards hold only their own passages, the public store the rest
    stores = tmp_path / "stores"
    shard_sizes = [
        len((stores / "clients" / f"client_{c:05d}" / "passages_0.jsonl").read_text().splitlines())
        for c in range(3)
    ]
    public = sum(
        len(f.read_text().splitlines()) for f in (stores / "public").glob("passages_*.jsonl")
    )
    total = sum(
        len(f.read_text().splitlines()) for f in (stores / "global").glob("passages_*.jsonl")
    )
    assert sum(shard_sizes) + public == total
    if serve == "actors":
        assert {s["store"] for s in res["shard_actors"]} == {"global", "public"}
