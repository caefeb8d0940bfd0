"""Robustness: update validation before aggregation, the chaos knob, Flower's robust
strategies (and FedAvgM's server step, built the same way). Real Flower strategies and
messages; one real federated run on Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from shared_data import write_pubmedqa_items

from fedrag_ray.config import ConfigError, config_from_dict
from fedrag_ray.federated.faults import parse_faults
from fedrag_ray.federated.params import from_record, to_record
from fedrag_ray.federated.strategies import (
    build_strategy,
    load_strategy_state,
    strategy_state,
)
from fedrag_ray.federated.validation import split_valid

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def tiny_federated(tmp_path, federation: dict) -> dict:
    """A federated run at test size: 40 PubMedQA items, tiny generator, 1 local step."""

    path = write_pubmedqa_items(tmp_path / "pubmedqa_40.json", 40)
    return {
        "name": "tiny",
        "data": {"path": str(path), "max_train": 16, "max_eval": 4},
        "eval": {"generate": False},
        "generator": {"model": "tiny-random", "max_length": 96},
        "retriever": {"max_length": 64},  # half the embedding work of each index build
        "train": {"method": "ralt", "batch_size": 2, "ralt": {"k": 2}},
        "federation": {
            "num_clients": 2,
            "rounds": 2,
            "local_steps": 1,
            "num_actors": 1,
            **federation,
        },  # one actor: see test_federated.tiny
    }


GLOBAL = {
    "generator.lora_A": np.zeros((4, 16), np.float32),
    "generator.lora_B": np.zeros((16, 4), np.float32),
}


def reply(pid: int, arrays: dict[str, np.ndarray], n: int = 5) -> Message:
    sent = Message(RecordDict(), dst_node_id=100 + pid, message_type=MessageType.TRAIN)
    metrics = MetricRecord({"num-examples": n, "partition-id": pid})
    return Message(RecordDict({"arrays": to_record(arrays), "metrics": metrics}), reply_to=sent)


def moved(delta: float) -> dict[str, np.ndarray]:
    return {k: v + delta for k, v in GLOBAL.items()}


def test_validation_rejects_nan_shape_keys_and_huge_norms_with_named_reasons():
    nan = moved(0.01)
    nan["generator.lora_B"][3, 1] = np.nan
    inf = moved(0.01)
    inf["generator.lora_A"][0, 0] = np.inf
    shape = moved(0.01)
    shape["generator.lora_A"] = shape["generator.lora_A"][:-1]
    keys = moved(0.01)
    keys["generator.extra"] = keys.pop("generator.lora_B")
    huge = moved(10.0)  # norm 10 * sqrt(128) = 113
    replies = [
        reply(0, moved(0.01)),
        reply(1, nan),
        reply(2, inf),
        reply(3, shape),
        reply(4, keys),
        reply(5, huge),
        reply(6, moved(0.01), n=0),
    ]
    ok, reasons, norms = split_valid(replies, GLOBAL, max_update_norm=5.0)
    assert [int(r.content["metrics"]["partition-id"]) for r in ok] == [0]
    assert norms[0] == pytest.approx(0.01 * np.sqrt(128), rel=1e-5)
    text = "\n".join(reasons)
    assert "partition 1: 1 non-finite values (NaN/inf) in generator.lora_B" in text
    assert "partition 2: 1 non-finite values (NaN/inf) in generator.lora_A" in text
    assert "partition 3: wrong shape for generator.lora_A: (3, 16), expected (4, 16)" in text
    assert (
        "partition 4: wrong keys (missing ['generator.lora_B'], unexpected ['generator.extra'])"
        in text
    )
    assert "partition 5: update norm 113.1 above the bound 5" in text
    assert "partition 6: num-examples must be a positive finite number" in text
    # without a bound the large (finite, well-formed) update passes
    ok, _, _ = split_valid([reply(5, huge)], GLOBAL, max_update_norm=None)
    assert len(ok) == 1


def test_chaos_knob_parses_every_fault_and_corrupts_as_named():
    f = parse_faults("raise:1,kill:2@3,nan:4,shape:5,scale:6×1000,scale:7x10,signflip:7")
    assert f.raise_on == {1} and f.kill_on == {2: 3} and f.nan == {4} and f.shape == {5}
    assert f.scale == {6: 1000.0, 7: 10.0} and f.signflip == {7}
    received = moved(0.5)
    trained = moved(0.6)
    flipped = f.corrupt(7, trained, received)  # update 0.1 -> -10 x 0.1
    np.testing.assert_allclose(flipped["generator.lora_A"], 0.5 - 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        f.corrupt(6, trained, received)["generator.lora_B"], 100.5, rtol=1e-5
    )
    assert np.isnan(f.corrupt(4, trained, received)["generator.lora_A"]).any()
    assert f.corrupt(5, trained, received)["generator.lora_A"].shape == (3, 16)
    assert f.corrupt(0, trained, received) is trained  # healthy partitions untouched
    for bad in ("explode:1", "scale:3", "nan:2@4", "raise:x"):
        with pytest.raises(ValueError, match="FEDRAG_RAY_FAULTS"):
            parse_faults(bad)


def _strategy(name: str, **params):
    cfg = config_from_dict({"federation": {"strategy": {"name": name, **params}}})
    return build_strategy(cfg.federation.strategy)


@pytest.mark.parametrize(
    "name,params",
    [
        ("fedmedian", {}),
        ("fedtrimmedavg", {"trim_beta": 0.2}),
        ("krum", {"num_malicious_nodes": 1}),
        ("multikrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 4}),
        ("bulyan", {"num_malicious_nodes": 1}),
    ],
)
def test_robust_strategies_resist_one_sign_flipping_client_where_fedavg_does_not(name, params):
    """7 honest clients move every weight by ~+0.1; client 7 sends -10x that."""
    rng = np.random.default_rng(0)
    honest = [
        {
            k: v + 0.1 + 0.01 * rng.standard_normal(v.shape).astype(np.float32)
            for k, v in GLOBAL.items()
        }
        for _ in range(7)
    ]
    attacker = {k: v - 1.0 for k, v in GLOBAL.items()}

    def replies():
        return [reply(i, a) for i, a in enumerate([*honest, attacker])]

    fedavg, _ = _strategy("fedavg").aggregate_train(1, replies())
    robust, _ = _strategy(name, **params).aggregate_train(1, replies())
    assert robust is not None
    avg, rob = from_record(fedavg), from_record(robust)
    for k in GLOBAL:
        assert np.mean(avg[k]) < 0  # FedAvg is dragged past the start, the wrong way
        assert np.mean(rob[k]) == pytest.approx(0.1, abs=0.02), name


def test_fedavgm_steps_server_lr_times_the_mean_delta_with_momentum_and_resumes(tmp_path):
    """server_lr 2, momentum 0.5, clients that each move every weight by +0.1: round 1
    goes 0 -> 0.2; round 2 from 0.2: pseudo-gradient -0.1, momentum -0.15, so 0.5. The
    state a checkpoint keeps (arrays + momentum) resumes round 3 to the same arrays."""
    from fedrag_ray.federated.checkpoint import RoundCheckpoint, load_checkpoint, save_checkpoint

    def round_(strategy, server_round: int, start: float) -> dict[str, np.ndarray]:
        replies = [reply(i, moved(start + 0.1 + 0.01 * (i - 1))) for i in range(3)]
        new, _ = strategy.aggregate_train(server_round, replies)
        return from_record(new)

    strategy = _strategy("fedavgm", server_lr=2.0, server_momentum=0.5)
    load_strategy_state(strategy, {"current_arrays": GLOBAL, "momentum_vector": None})
    for k, v in round_(strategy, 1, 0.0).items():
        np.testing.assert_allclose(v, 0.2, atol=1e-6, err_msg=k)
    for k, v in round_(strategy, 2, 0.2).items():
        np.testing.assert_allclose(v, 0.5, atol=1e-6, err_msg=k)

    ckpt = RoundCheckpoint(2, from_record(strategy.current_arrays), strategy_state(strategy), "h")
    save_checkpoint(tmp_path, ckpt)
    resumed = _strategy("fedavgm", server_lr=2.0, server_momentum=0.5)
    load_strategy_state(resumed, load_checkpoint(tmp_path).strategy_state)
    straight, again = round_(strategy, 3, 0.5), round_(resumed, 3, 0.5)
    for k in GLOBAL:  # momentum -0.175 carried over: 0.5 + 2 * 0.175
        np.testing.assert_allclose(straight[k], 0.85, atol=1e-6, err_msg=k)
        np.testing.assert_array_equal(straight[k], again[k])
    fedavg = _strategy("fedavgm")  # server_lr 1, no momentum: plain FedAvg
    load_strategy_state(fedavg, {"current_arrays": GLOBAL})
    for k, v in round_(fedavg, 1, 0.0).items():
        np.testing.assert_allclose(v, 0.1, atol=1e-6, err_msg=k)


def test_strategy_and_privacy_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="federation.strategy.trim_beta"):
        config_from_dict({"federation": {"strategy": {"name": "fedtrimmedavg", "trim_beta": 0.7}}})
    with pytest.raises(ConfigError, match="federation.strategy.name: got 'median'"):
        config_from_dict({"federation": {"strategy": {"name": "median"}}})
    with pytest.raises(ConfigError, match="secure aggregation hides"):
        config_from_dict(
            {
                "federation": {
                    "strategy": {"name": "krum"},
                    "privacy": {"secagg": {"enabled": True}},
                }
            }
        )
    with pytest.raises(ConfigError, match="never sees one client's update"):
        config_from_dict(
            {
                "federation": {
                    "validation": {"max_update_norm": 1.0},
                    "privacy": {"secagg": {"enabled": True}},
                }
            }
        )
    with pytest.raises(ConfigError, match="federation.validation.max_norm: unknown field"):
        config_from_dict({"federation": {"validation": {"max_norm": 3}}})


@pytest.mark.timeout(600)
def test_nan_shape_and_scaled_replies_are_rejected_and_named_in_a_real_run(tmp_path, monkeypatch):
    """4 clients, 2 rounds on Flower's Ray backend: partition 1 replies NaN, 2 a wrong
    shape, 3 an update x1000. Each is dropped with its reason; the model stays finite and
    is the healthy client's update."""
    from fedrag_ray.federated import run_federated

    monkeypatch.setenv("FEDRAG_RAY_FAULTS", "nan:1,shape:2,scale:3×1000")
    raw = tiny_federated(
        tmp_path,
        {"num_clients": 4, "rounds": 2, "min_successes": 1, "validation": {"max_update_norm": 1.0}},
    )
    res = run_federated(config_from_dict(raw), tmp_path / "run")
    rounds = [h for h in res["history"] if h["round"] > 0]
    for h in rounds:
        assert h["succeeded"] == 1 and h["failed"] == 3 and h["rejected"] == 3
        assert h["aggregated"] is True
        assert [c["partition-id"] for c in h["clients"]] == [0]
        reasons = "\n".join(h["failure_reasons"])
        assert "rejected partition 1:" in reasons and "non-finite values (NaN/inf)" in reasons
        assert "rejected partition 2: wrong shape for generator." in reasons
        assert "rejected partition 3: update norm" in reasons and "above the bound 1" in reasons
        assert 0 < h["clients"][0]["update-norm"] < 1.0
    assert all(np.isfinite(a).all() for a in res["final_arrays"].values())
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["failures"] == 6
    assert "rejected partition 3" in "".join(saved["history"][1]["failure_reasons"])
