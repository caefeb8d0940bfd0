"""Heterogeneous clients on a simulated clock (issue 29): the clock and FedBuff's update by
hand (pure), then real federated runs (Flower on Ray, tiny-random generator): deadline
drops and tier accounting, availability respected, FedBuff with M = K = C equal to
synchronous FedAvg bit for bit, and a killed FedBuff run resumed bit-identically."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_federated import (  # noqa: F401
    cli,
    kill_after_first_checkpoint,
    reference_run,
    tiny,
    tiny_data,
    write_yaml,
)

from fedrag_ray.config import ConfigError, RoundPolicyConfig, config_from_dict
from fedrag_ray.federated.clock import (
    SimClock,
    assign_tiers,
    buffered_update,
    largest_remainder,
    round_cut,
    staleness_weights,
)

TWO_TIERS = [
    {"name": "fast", "share": 0.75, "tokens_per_s": 1e9, "local_steps": 2},
    # far too slow for any deadline below: 184 x 1e-4 tokens/s (a step has hundreds),
    # and a 10 kB/s downlink
    {"name": "slow", "share": 0.25, "speed": 1e-4, "downlink_mbps": 0.08},
]


def fed(**fields) -> dict:
    return config_from_dict({"federation": fields}).federation


# --------------------------------------------------------------------------- pure


@pytest.mark.unit
def test_clock_by_hand_for_three_clients() -> None:
    """durations = tokens / tokens_per_s + bytes down / downlink + bytes up / uplink
    (Mbit/s x 1e6 / 8), then each synchronous policy's cut, all computed by hand."""
    f = fed(
        num_clients=3,
        clients={
            "profiles": [
                {
                    "name": "fast",
                    "share": 0.5,
                    "tokens_per_s": 100,
                    "uplink_mbps": 8,
                    "downlink_mbps": 8,
                },
                {
                    "name": "slow",
                    "share": 0.5,
                    "speed": 0.05,
                    "uplink_mbps": 0.8,
                    "downlink_mbps": 0.8,
                },
            ],
            "reference_tokens_per_s": 200,
        },
    )
    clock = SimClock.from_config(f, seed=0)
    clock.tier_of = np.array([0, 0, 1])  # clients 0, 1 fast; client 2 slow (10 tokens/s)
    pids = np.array([0, 1, 2])
    d = clock.durations(pids, [200, 50, 30], [1e6, 1e6, 1e6], [1e6, 1e6, 1e6])
    # 200/100 + 1 + 1; 50/100 + 1 + 1; 30/10 + 1e6/1e5 + 1e6/1e5
    np.testing.assert_allclose(d, [4.0, 2.5, 23.0])

    kept, seconds = round_cut(RoundPolicyConfig(type="sync"), pids, d, 3)
    assert kept.tolist() == [True, True, True] and seconds == 23.0
    kept, seconds = round_cut(RoundPolicyConfig(type="deadline", deadline_s=5), pids, d, 3)
    assert kept.tolist() == [True, True, False] and seconds == 5.0
    kept, seconds = round_cut(RoundPolicyConfig(type="deadline", deadline_s=50), pids, d, 3)
    assert kept.all() and seconds == 23.0  # min(deadline, slowest)
    policy = RoundPolicyConfig(type="over_selection", over_selection=0.5)
    kept, seconds = round_cut(policy, pids, d, 2)
    assert kept.tolist() == [True, True, False] and seconds == 4.0  # until the 2nd finish
    # ties go to the lower partition id
    kept, _ = round_cut(policy, np.array([5, 3, 9]), np.array([1.0, 1.0, 1.0]), 2)
    assert kept.tolist() == [True, True, False] and set(np.array([5, 3, 9])[kept]) == {3, 5}


@pytest.mark.unit
def test_without_profiles_every_duration_is_zero_and_everyone_available() -> None:
    clock = SimClock.from_config(fed(num_clients=5), seed=1)
    assert not clock.heterogeneous and clock.names == ["default"]
    assert clock.durations(np.arange(5), [10**6] * 5, [10**9] * 5, [10**9] * 5).tolist() == [0] * 5
    assert clock.available(1e6, 3) is None and clock.client_local_steps() is None


@pytest.mark.unit
def test_tiers_by_exact_counts_in_a_seeded_permutation() -> None:
    # 16 x (0.45, 0.45, 0.1) = 7.2, 7.2, 1.6: floors 7, 7, 1 and the one left to the .6
    assert largest_remainder([0.45, 0.45, 0.1], 16).tolist() == [7, 7, 2]
    assert largest_remainder([0.5, 0.5], 3).tolist() == [2, 1]  # a tie: the earlier tier
    a, b = assign_tiers([0.45, 0.45, 0.1], 16, 7), assign_tiers([0.45, 0.45, 0.1], 16, 7)
    assert np.array_equal(a, b) and np.bincount(a).tolist() == [7, 7, 2]
    assert not np.array_equal(a, assign_tiers([0.45, 0.45, 0.1], 16, 8))


@pytest.mark.unit
def test_availability_patterns_by_hand() -> None:
    f = fed(
        num_clients=400,
        clients={
            "profiles": [
                {
                    "name": "day",
                    "share": 0.5,
                    "speed": 1,
                    "availability": {"type": "daily", "on_hours": [8, 20]},
                },
                {
                    "name": "night",
                    "share": 0.25,
                    "speed": 1,
                    "availability": {"type": "daily", "on_hours": [22, 6]},
                },
                {
                    "name": "coin",
                    "share": 0.25,
                    "speed": 1,
                    "availability": {"type": "probability", "p": 0.3},
                },
            ]
        },
    )
    clock = SimClock.from_config(f, seed=3)
    for t in (0.0, 5 * 3600.0, 13.5 * 3600.0):
        on = clock.available(t, draw=1)
        hour = (t / 3600 + clock.offset_h) % 24
        day, night, coin = (clock.tier_of == i for i in range(3))
        assert np.array_equal(on[day], ((hour >= 8) & (hour < 20))[day])
        assert np.array_equal(on[night], ((hour >= 22) | (hour < 6))[night])
        assert 0.15 < on[coin].mean() < 0.45  # p = 0.3 over 100 clients
    # a probability draw is a function of (seed, round): the same again, another next round
    assert np.array_equal(clock.available(0.0, 1), clock.available(0.0, 1))
    assert not np.array_equal(clock.available(0.0, 1), clock.available(0.0, 2))


@pytest.mark.unit
def test_staleness_weighted_update_by_hand() -> None:
    """current + lr * sum(w_i delta_i) / sum(w_i), w_i = n_i (1 + staleness_i)^-0.5."""
    current = {"a": np.array([1.0, 1.0], dtype=np.float32)}
    received = [{"a": np.array([0.0, 0.0], np.float32)}, current, {"a": np.array([2.0, 2.0])}]
    trained = [
        {"a": np.array([1.0, 0.0], np.float32)},
        {"a": np.array([1.0, 3.0], np.float32)},
        {"a": np.array([3.0, 2.0], np.float32)},
    ]
    staleness = [3, 0, 8]  # deltas [1, 0], [0, 2], [1, 0]
    w = staleness_weights([4, 1, 3], staleness, 0.5)
    np.testing.assert_allclose(w, [4 / 2, 1.0, 3 / 3])  # 4 x 4^-.5, 1 x 1, 3 x 9^-.5
    # sum w delta = 2 [1, 0] + [0, 2] + [1, 0] = [3, 2]; / 4 = [0.75, 0.5]
    new = buffered_update(current, trained, received, staleness, w, server_lr=1.0)
    np.testing.assert_allclose(new["a"], [1.75, 1.5], rtol=1e-6)
    assert new["a"].dtype == np.float32
    new = buffered_update(current, trained, received, staleness, w, server_lr=2.0)
    np.testing.assert_allclose(new["a"], [2.5, 2.0], rtol=1e-6)


@pytest.mark.unit
def test_fresh_buffer_is_flowers_fedavg_bit_for_bit() -> None:
    """No staleness and server_lr 1: the same bits as Flower's FedAvg aggregation."""
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedrag_ray.federated.params import from_record, to_record

    rng = np.random.default_rng(0)
    current = {"x": rng.normal(size=(7, 5)).astype(np.float32)}
    trained = [{"x": rng.normal(size=(7, 5)).astype(np.float32)} for _ in range(3)]
    n = [5, 2, 9]
    new = buffered_update(
        current, trained, [current] * 3, [0, 0, 0], staleness_weights(n, [0, 0, 0], 0.5), 1.0
    )
    records = [
        RecordDict({"arrays": to_record(t), "metrics": MetricRecord({"num-examples": k})})
        for t, k in zip(trained, n, strict=True)
    ]
    flower = from_record(aggregate_arrayrecords(records, "num-examples"))
    assert np.array_equal(new["x"], flower["x"])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("federation", "field"),
    [
        (
            {"clients": {"profiles": [{"name": "a", "share": 0.6, "speed": 1}]}},
            "federation.clients",
        ),
        ({"clients": {"profiles": [{"name": "a", "share": 1}]}}, "federation.clients.profiles.0"),
        ({"round_policy": {"type": "deadline"}}, "round_policy.deadline_s"),
        ({"round_policy": {"type": "over_selection"}}, "round_policy.over_selection"),
        ({"round_policy": {"type": "fedbuff"}}, "round_policy.buffer_size"),
        (
            {
                "clients": {
                    "profiles": [
                        {
                            "name": "a",
                            "share": 1,
                            "speed": 1,
                            "availability": {"type": "probability"},
                        }
                    ]
                }
            },
            "availability.p",
        ),
        (
            {
                "clients": {
                    "profiles": [
                        {"name": "a", "share": 1, "speed": 1, "availability": {"type": "daily"}}
                    ]
                }
            },
            "availability.on_hours",
        ),
        (
            {
                "round_policy": {"type": "fedbuff", "buffer_size": 2},
                "privacy": {"secagg": {"enabled": True}},
            },
            "privacy.secagg",
        ),
        (
            {
                "round_policy": {"type": "deadline", "deadline_s": 9},
                "privacy": {"mode": "central", "noise_multiplier": 1.0},
            },
            "privacy.mode central",
        ),
        (
            {
                "round_policy": {"type": "fedbuff", "buffer_size": 2},
                "strategy": {"name": "fedadam"},
            },
            "fedadam",
        ),
        ({"round_policy": {"type": "fedbuff", "buffer_size": 2, "concurrency": 99}}, "concurrency"),
        ({"round_policy": {"type": "sync", "deadlin_s": 3}}, "round_policy.deadlin_s"),
    ],
)
def test_bad_config_names_the_field(federation: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config_from_dict({"federation": {"num_clients": 4, **federation}})


@pytest.mark.unit
def test_a_sweep_over_policies_and_tier_mixes_is_checked_like_any_space() -> None:
    """Tune's search spaces are dotted config paths: round policies and tier mixes are
    swept like any field, and a bad first value fails naming the field before any trial."""
    from fedrag_ray.tune import parse_tune_config

    policies = [{"type": "fedbuff", "buffer_size": 2}, {"type": "sync"}]
    mixes = [TWO_TIERS, [{"name": "all", "share": 1.0, "speed": 1.0}]]
    raw = {
        "federation": {"num_clients": 4},
        "tune": {
            "metric": "train_loss",
            "mode": "min",
            "search_alg": "grid",
            "space": {
                "federation.round_policy": {"type": "grid", "values": policies},
                "federation.clients.profiles": {"type": "grid", "values": mixes},
            },
        },
    }
    tc = parse_tune_config(raw)
    assert tc.space["federation.round_policy"].values == policies
    raw["tune"]["space"]["federation.round_policy"]["values"] = [{"type": "deadline"}]
    with pytest.raises(ConfigError, match=r"round_policy\.deadline_s"):
        parse_tune_config(raw)


# --------------------------------------------------------------------------- federated


@pytest.mark.timeout(900)
def test_deadline_drops_the_slow_tier_and_the_tier_shares_say_so(tmp_path) -> None:
    """4 clients, one slow (a step of hundreds of tokens at 0.0184 tokens/s): a 60 s
    deadline drops it every round, named with its tier; the round lasts the deadline;
    the fast tier's own local_steps (2) reach its clients; none of the slow tier's
    examples reached the model, all of the fast tier's did."""
    from fedrag_ray.federated import run_federated

    raw = tiny(
        {
            "num_clients": 4,
            "rounds": 2,
            "clients": {"profiles": TWO_TIERS},
            "round_policy": {"type": "deadline", "deadline_s": 60},
        }
    )
    res = run_federated(config_from_dict(raw), tmp_path, num_cpus=2)
    het = res["heterogeneity"]
    slow = het["client_tiers"].index(1)
    assert sorted(het["client_tiers"]) == [0, 0, 0, 1]  # exact counts: 3 fast, 1 slow
    rounds = [h for h in res["history"] if h["round"] > 0]
    for h in rounds:
        assert h["stragglers_dropped"] == 1 and h["succeeded"] == 3 and h["aggregated"]
        assert h["stragglers"] == [{"partition-id": slow, "tier": "slow"}]
        assert h["sim_seconds"] == 60.0
        by_pid = {c["partition-id"]: c for c in h["clients"]}
        assert by_pid[slow]["dropped"] and by_pid[slow]["sim_seconds"] > 1000
        assert by_pid[slow]["steps"] == 1  # the federation's local_steps
        fast = [c for p, c in by_pid.items() if p != slow]
        assert all(not c["dropped"] and c["steps"] == 2 and c["tier"] == "fast" for c in fast)
        assert all(0 < c["sim_seconds"] < 60 and c["train-tokens"] > 0 for c in fast)
        assert h["tier_sent"] == {"fast": 3, "slow": 1}
        assert h["tier_reached"] == {"fast": 3, "slow": 0}
    assert [h["sim_time"] for h in rounds] == [60.0, 120.0]
    tiers = het["per_tier"]
    assert tiers["slow"] == {
        **tiers["slow"],
        "clients": 1,
        "tasks_sent": 2,
        "tasks_reached_model": 0,
        "examples_reached_share": 0.0,
    }
    assert tiers["fast"]["tasks_reached_model"] == 6
    assert tiers["fast"]["examples_reached_share"] == 1.0
    assert res["sim_time"] == 120.0
    assert (tmp_path / "metric_vs_sim_time.png").stat().st_size > 1000


@pytest.mark.timeout(900)
def test_unavailable_clients_never_train_and_over_selection_keeps_the_first(tmp_path) -> None:
    """A daily tier (on 4-22 h of each client's own day) and a probability tier (p 0.8),
    over-selection of 100% (6 sampled for 3): every client that trained was available at
    its round's simulated start, recomputed here from the recorded offsets and the seeded
    draws; rows say when fewer were available than wanted; the 3 kept are the first 3 to
    finish, the rest dropped and named."""
    from fedrag_ray.federated import run_federated

    profiles = [
        {
            "name": "office",
            "share": 0.5,
            "speed": 1,
            "availability": {"type": "daily", "on_hours": [4, 22]},
        },
        {
            "name": "coin",
            "share": 0.5,
            "speed": 0.2,
            "availability": {"type": "probability", "p": 0.8},
        },
    ]
    raw = tiny(
        {
            "num_clients": 6,
            "clients_per_round": 3,
            "rounds": 3,
            "clients": {"profiles": profiles},
            "round_policy": {"type": "over_selection", "over_selection": 1.0},
        },
        seed=5,
    )
    cfg = config_from_dict(raw)
    res = run_federated(cfg, tmp_path, num_cpus=2)
    clock = SimClock.from_config(cfg.federation, cfg.seed)
    het = res["heterogeneity"]
    assert het["client_tiers"] == clock.tier_of.tolist()
    np.testing.assert_allclose(het["client_offset_hours"], clock.offset_h, atol=1e-4)
    trained = offline = cut = 0
    for h in (h for h in res["history"] if h["round"] > 0):
        on = clock.available(h["sim_time"] - h["sim_seconds"], h["round"])
        pids = [c["partition-id"] for c in h["clients"]]
        assert all(on[p] for p in pids), (h["round"], pids, on)
        assert len(pids) == min(6, int(on.sum()))  # every available one was sampled
        if on.sum() < 6:
            assert h["available"] == int(on.sum()) and h["wanted"] == 6
        else:
            assert "available" not in h
        kept = [c for c in h["clients"] if not c["dropped"]]
        dropped = [c for c in h["clients"] if c["dropped"]]
        assert len(kept) == min(3, len(pids)) and h["succeeded"] == len(kept)
        order = sorted(h["clients"], key=lambda c: (c["sim_seconds"], c["partition-id"]))
        assert {c["partition-id"] for c in order[:3]} == {c["partition-id"] for c in kept}
        assert h["stragglers"] == [
            {"partition-id": c["partition-id"], "tier": c["tier"]} for c in dropped
        ]
        if kept:
            assert h["sim_seconds"] == max(c["sim_seconds"] for c in kept)
        trained += len(pids)
        offline += 6 - int(on.sum())
        cut += len(dropped)
    assert trained > 0 and offline > 0 and cut > 0  # both patterns and the cut were exercised


def _final_arrays(out) -> dict[str, np.ndarray]:
    with np.load(out / "trainable_state.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.timeout(900)
def test_fedbuff_with_m_equal_k_equal_c_is_synchronous_fedavg(tmp_path) -> None:
    """Buffer size = clients per round = concurrency, equal durations (no profiles: all
    0 s): every arrival of an update is fresh and the replacements are the sampler's
    next round, so FedBuff's final arrays are FedAvg's, bit for bit."""
    from fedrag_ray.federated import run_federated

    base = {"num_clients": 4, "clients_per_round": 2, "rounds": 3}
    sync = run_federated(config_from_dict(tiny(base, seed=2)), tmp_path / "sync", num_cpus=2)
    buff = tiny({**base, "round_policy": {"type": "fedbuff", "buffer_size": 2}}, seed=2)
    fedbuff = run_federated(config_from_dict(buff), tmp_path / "fedbuff", num_cpus=2)
    a, b = sync["final_arrays"], fedbuff["final_arrays"]
    assert set(a) == set(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    start = _initial(tmp_path / "sync")
    assert any(not np.array_equal(a[k], start[k]) for k in a)  # it did train
    for hs, hb in zip(sync["history"][1:], fedbuff["history"][1:], strict=True):
        assert [c["partition-id"] for c in hs["clients"]] == [
            c["partition-id"] for c in hb["clients"]
        ]
        assert all(c["staleness"] == 0 for c in hb["clients"])
        assert hb["round"] == hs["round"] and hb["sim_time"] == 0.0


def _initial(run_dir) -> dict[str, np.ndarray]:
    """Round 0's arrays are not saved; a fresh tiny system's trainable state is them."""
    from fedrag_ray.rag import RAGSystem

    cfg = json.loads((run_dir / "results.json").read_text())["config"]
    return RAGSystem(config_from_dict(cfg)).trainable_state()


FEDBUFF_ASYNC = {
    "num_clients": 4,
    "clients_per_round": 3,
    "rounds": 4,
    "clients": {
        "profiles": [
            # a fast task ~1 s (one step, ~350 tokens); a slow one ~2.5 s (two steps): it
            # arrives after an update or two, stale
            {"name": "fast", "share": 0.5, "tokens_per_s": 400},
            {"name": "slow", "share": 0.5, "tokens_per_s": 300, "local_steps": 2},
        ]
    },
    "round_policy": {"type": "fedbuff", "buffer_size": 2, "staleness_exponent": 0.5},
}


@pytest.mark.timeout(1500)
def test_killed_fedbuff_run_resumes_bit_identically(tmp_path) -> None:
    """Asynchronous for real (3 in flight, an update every 2 arrivals, two speeds: stale
    arrivals): the driver is killed after an update with tasks in flight on older
    versions; the resumed run recomputes them and ends with the same arrays, bit for
    bit, the same rows (clients, staleness, simulated time) as the uninterrupted run."""
    cfg_path = write_yaml(tmp_path / "exp.yaml", tiny(FEDBUFF_ASYNC, seed=4))
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    with reference_run(cfg_path, straight):
        killed = kill_after_first_checkpoint(cfg_path, crashed)
        assert killed["round"] < 4 and killed["extra"]["fedbuff"]["in_flight"]

        proc = cli("simulate", str(cfg_path), "--resume", str(crashed))
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((crashed / "results.json").read_text())
    assert b["resumed_from_round"] == killed["round"]
    sa, sb = _final_arrays(straight), _final_arrays(crashed)
    assert set(sa) == set(sb) and all(np.array_equal(sa[k], sb[k]) for k in sa)
    # it was asynchronous: some arrival was stale
    rows_a = [h for h in a["history"] if h["round"] > 0]
    assert max(h["staleness_max"] for h in rows_a) >= 1
    keys = ("partition-id", "staleness", "version_received", "sim_seconds", "train-loss")
    for ha, hb in zip(rows_a, b["history"][1:], strict=True):
        assert ha["sim_time"] == hb["sim_time"]
        assert [[c[k] for k in keys] for c in ha["clients"]] == [
            [c[k] for k in keys] for c in hb["clients"]
        ]
    assert a["heterogeneity"]["per_tier"] == b["heterogeneity"]["per_tier"]


@pytest.mark.unit
def test_benchmarks_page_shows_heterogeneity_json_when_present_and_nothing_when_absent(
    tmp_path,
) -> None:
    from benchmarks import report

    def run(policy: str, em: float, to_target: float | None, ratio: float | None) -> dict:
        return {
            "policy": policy,
            "final": {"exact_match": em, "exact_match_lo": em - 0.05, "exact_match_hi": em + 0.05},
            "sim_time_s": 7200.0,
            "time_to_target_s": to_target,
            "time_ratio_to_sync": ratio,
            "per_tier": {
                "fast": {"examples_reached_share": 1.0},
                "slow": {"examples_reached_share": 0.0},
            },
        }

    doc = {
        "benchmark": "heterogeneity",
        "setup": {"tiers": [{"name": "fast"}, {"name": "slow"}], "clients": 16},
        "verdict": {
            "target_em": 0.19,
            "target_ratio": 0.5,
            "best_deadline_or_async_ratio": 0.4,
            "met": True,
        },
        "runs": [
            run("sync", 0.2, 3600.0, 1.0),
            run("fedbuff", 0.25, 1440.0, 0.4),
            run("deadline", 0.1, None, None),
        ],
    }
    (tmp_path / "heterogeneity.json").write_text(json.dumps(doc))
    page = report.render_docs(tmp_path)
    assert "Heterogeneous clients" in page and "✔" in page
    assert "| fedbuff | 0.250 [0.200, 0.300] | 2.00 | 0.40 | 0.40 | 1.00 | 0.00 |" in page
    assert "| deadline | 0.100 [0.050, 0.150] | 2.00 | not reached | - |" in page
    (tmp_path / "heterogeneity.json").unlink()
    assert "Heterogeneous clients" not in report.render_docs(tmp_path)
