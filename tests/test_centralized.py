"""End-to-end centralized run on a tiny slice of the bundled PubMedQA sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
from shared_data import write_pubmedqa_items

from fedrag_ray.centralized import prepare_store, run_centralized
from fedrag_ray.config import config_from_dict
from fedrag_ray.data import load_dataset_from_config
from fedrag_ray.knowledge_store import KnowledgeStore

TIMINGS = ("setup_s", "index_s", "eval_before_s", "train_s", "eval_after_s", "total_s")


@pytest.fixture(scope="module")
def centralized_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("centralized")
    data = write_pubmedqa_items(tmp / "pqa_small.json", 30)
    cfg = config_from_dict(
        {
            "name": "tiny-central",
            "seed": 3,
            "data": {"path": str(data), "max_train": 8, "max_eval": 4},
            "retriever": {"max_length": 64},
            "generator": {"model": "tiny-random", "max_length": 64},
            "knowledge_store": {"path": str(tmp / "index")},
            "rag": {"max_new_tokens": 4},
            "train": {"method": "ralt", "batch_size": 4, "lr": 5e-3},
        }
    )
    phases, steps = [], []
    results = run_centralized(
        cfg, tmp / "out", on_step=lambda s, loss: steps.append((s, loss)), on_phase=phases.append
    )
    return cfg, tmp, results, phases, steps


def test_results_json(centralized_run):
    cfg, tmp, results, phases, steps = centralized_run
    saved = json.loads((tmp / "out" / "results.json").read_text())
    assert "system" not in saved
    assert saved["seed"] == 3 and saved["method"] == "ralt" and saved["mode"] == "centralized"
    assert saved["config"] == cfg.model_dump(mode="json")
    assert saved["num_train"] == 8 and saved["num_eval"] == 4
    assert saved["steps"] == 2 and len(saved["loss_history"]) == 2
    assert [s for s, _ in steps] == [1, 2]
    assert saved["loss_history"] == pytest.approx([loss for _, loss in steps])
    for when in ("metrics_before", "metrics_after"):
        m = saved[when]
        for key in ("recall@1", "recall@5", "mrr", "accuracy", "closed_book_accuracy"):
            assert 0.0 <= m[key] <= 1.0, (when, key)
        assert m["n"] == 4
    # RALT leaves the retriever alone: retrieval metrics cannot move
    for key in ("recall@1", "recall@5", "mrr"):
        assert saved["metrics_after"][key] == saved["metrics_before"][key]
    assert set(TIMINGS) <= set(saved["timings"])
    assert all(saved["timings"][k] >= 0 for k in TIMINGS)
    assert saved["timings"]["total_s"] >= saved["timings"]["train_s"]
    assert saved["trainable_parameters"] > 0 and saved["full_model_bytes"] > 0
    assert any("indexing" in p for p in phases) and any("training" in p for p in phases)


def test_loss_curve_and_trainable_state(centralized_run):
    _, tmp, results, _, _ = centralized_run
    png = (tmp / "out" / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    with np.load(tmp / "out" / "trainable_state.npz") as npz:
        state = {k: npz[k] for k in npz.files}
    live = results["system"].trainable_state()
    assert state.keys() == live.keys()
    assert all(k.startswith("generator.") and "lora_" in k for k in state)
    assert all(np.array_equal(state[k], live[k]) for k in state)  # saved after training
    assert sum(v.size for v in state.values()) == results["trainable_parameters"]
    # LoRA B starts at zero: non-zero B in the file means the trained adapters were saved
    b_keys = [k for k in state if "lora_B" in k]
    assert b_keys and all(np.abs(state[k]).sum() > 0 for k in b_keys)


def test_saved_index_is_reused(centralized_run):
    cfg, tmp, results, _, _ = centralized_run
    store = KnowledgeStore.load(tmp / "index", expected_dim=384)
    data = load_dataset_from_config(cfg.data)
    assert len(store) == len(data.passages) == results["num_passages"]
    system = results["system"]
    reloaded = prepare_store(system, data)
    assert system.store is reloaded and [p.id for p in reloaded.passages] == [
        p.id for p in data.passages
    ]
    q = system.retriever.encode_queries([e.question for e in data.eval])
    np.testing.assert_array_equal(reloaded.search(q, 5)[1], store.search(q, 5)[1])
