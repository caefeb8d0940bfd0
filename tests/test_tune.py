"""Ray Tune sweeps with a real Flower simulation inside every trial."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from shared_data import write_pubmedqa_items

from fedrag_ray.config import ConfigError
from fedrag_ray.tune import parse_tune_config, trial_actor_count


@pytest.fixture(scope="module")
def sweep_raw(tmp_path_factory) -> dict:

    data = write_pubmedqa_items(tmp_path_factory.mktemp("data") / "pubmedqa_30.json", 30)
    return {
        "name": "sweep-test",
        "seed": 0,
        "data": {"path": str(data), "max_train": 12, "max_eval": 6},
        "eval": {"generate": False},
        "generator": {"model": "tiny-random", "max_length": 96},
        "retriever": {"max_length": 64},  # half the embedding work of each index build
        "train": {"method": "ralt", "batch_size": 2, "ralt": {"k": 2}},
        "federation": {"num_clients": 2, "rounds": 2, "local_steps": 1},
        "tune": {
            "metric": "train_loss",
            "mode": "min",
            "search_alg": "grid",
            "space": {
                # 2 topologies x 2 learning rates
                "federation.num_clients": {"type": "grid", "values": [2, 3]},
                "train.lr": {"type": "grid", "values": [1.0e-3, 1.0e-2]},
            },
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
            "max_actors_per_trial": 1,
            "tracking": {"tensorboard": True},
        },
    }


def test_bad_search_space_names_the_field(sweep_raw):
    raw = json.loads(json.dumps(sweep_raw))
    raw["tune"]["space"]["train.lrr"] = {"type": "grid", "values": [1]}
    with pytest.raises(ConfigError, match="train.lrr"):
        parse_tune_config(raw)
    raw = json.loads(json.dumps(sweep_raw))
    raw["tune"]["space"]["train.lr"] = {"type": "loguniform", "values": [1]}
    with pytest.raises(ConfigError, match="tune.space.train.lr"):
        parse_tune_config(raw)


def test_trial_placement_group_is_sized_from_the_topology(sweep_raw):
    from fedrag_ray.tune import trial_resources

    tc = parse_tune_config(sweep_raw)
    base = {k: v for k, v in sweep_raw.items() if k != "tune"}
    pgf = trial_resources(base, tc)({"federation.num_clients": 3})
    assert pgf.bundles == [{"CPU": 1.0}, {"CPU": 1.0}]  # driver + 1 actor slot
    tc.max_actors_per_trial = 4
    assert trial_actor_count({"federation": {"num_clients": 3}}, tc) == 3
    assert len(trial_resources(base, tc)({"federation.num_clients": 3}).bundles) == 4


@pytest.mark.timeout(1500)
def test_four_trial_asha_sweep_runs_federations_and_best_config_reproduces(sweep_raw, tmp_path):
    """2 topologies x 2 learning rates, ASHA, 2 rounds each, on this 2-core machine.

    This fails if either nested-Ray trap returns: a Flower pool sized from the whole
    cluster deadlocks in round 1 inside the trial's placement group (trials then error
    on the round timeout or never report), and a `ray.shutdown()` at the end of the
    simulation kills the trial (trial errors)."""
    cfg = tmp_path / "sweep.yaml"
    raw = json.loads(json.dumps(sweep_raw))
    raw["federation"]["round_timeout_s"] = 300
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedrag_ray.cli", "tune", str(cfg), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=1400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "tune_results.json").read_text())
    trials = res["trials"]
    assert len(trials) == 4
    assert {(t["params"]["federation.num_clients"], t["params"]["train.lr"]) for t in trials} == {
        (2, 1e-3),
        (2, 1e-2),
        (3, 1e-3),
        (3, 1e-2),
    }
    for t in trials:
        assert t["error"] is None, t["error"]
        # every trial ran its federation and reported per round (ASHA may stop after 1)
        assert 1 <= t["rounds_reported"] <= 2
        assert [h["round"] for h in t["history"]] == list(range(1, t["rounds_reported"] + 1))
        assert t["metric"] is not None
    assert any(t["rounds_reported"] == 2 for t in trials)
    assert (out / "tune_results.csv").read_text().count("\n") == 5
    assert (out / "tune_results.png").stat().st_size > 1000
    assert "sweep ranked by train_loss" in proc.stderr + proc.stdout
    assert list((out / "sweep").rglob("events.out.tfevents*")), "TensorBoard logs missing"

    # best_config.yaml is accepted by `simulate` as is and reproduces the best metric
    best = res["best"]
    assert best["rounds_reported"] == 2
    best_cfg = yaml.safe_load((out / "best_config.yaml").read_text())
    assert "tune" not in best_cfg
    run = tmp_path / "best"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedrag_ray.cli",
            "simulate",
            str(out / "best_config.yaml"),
            "--output",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((run / "results.json").read_text())["history"][-1]
    assert final["train_loss"] == pytest.approx(best["metric"], rel=1e-5)


@pytest.mark.timeout(1200)
def test_sweep_with_eval_every_2_reports_the_metric_every_round(sweep_raw, tmp_path):
    """federation.eval_every 2 over 3 rounds: only rounds 2 and 3 are evaluated, yet Tune
    needs tune.metric in every report (it stopped the sweep before): rounds without an
    evaluation carry the last evaluated value (round 1: the initial evaluation's)."""
    raw = json.loads(json.dumps(sweep_raw))
    raw["federation"].update({"rounds": 3, "eval_every": 2, "round_timeout_s": 300})
    raw["tune"] = {
        "metric": "recall@5",
        "mode": "max",
        "search_alg": "grid",
        "space": {"train.lr": {"type": "grid", "values": [1.0e-3, 1.0e-2]}},
        "scheduler": {"name": "fifo"},
        "max_actors_per_trial": 1,
    }
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedrag_ray.cli", "tune", str(cfg), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    trials = json.loads((out / "tune_results.json").read_text())["trials"]
    assert len(trials) == 2
    for t in trials:
        assert t["error"] is None, t["error"]
        assert t["rounds_reported"] == 3
        assert [h["round"] for h in t["history"]] == [1, 2, 3]
        assert [h["evaluated_round"] for h in t["history"]] == [0, 2, 3]
        assert all(isinstance(h["recall@5"], float) for h in t["history"])
        assert t["metric"] == pytest.approx(t["history"][-1]["recall@5"], rel=1e-9)
    # the carried value is the one measured: round 1 reports round 0's evaluation
    run = next((out / "sweep").glob("*/run/results.json"))
    history = json.loads(run.read_text())["history"]
    assert "recall@5" not in history[1] and "recall@5" in history[2]
