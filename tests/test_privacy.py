"""Differential privacy, the privacy ledger and SecAgg+, with Flower's own parts.

Unit tests drive Flower's DP wrappers / mods / accountant on real messages; the
federated tests run SecAgg+ (Flower's workflow and client mod) on Flower's Ray backend.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import GaussianPrivacyEvent
from flwr.supercore.task_identity import TaskIdentity
from shared_data import write_pubmedqa_items

from fedrag_ray.config import ConfigError, config_from_dict
from fedrag_ray.federated.params import from_record, to_record
from fedrag_ray.federated.privacy import (
    PrivacyLedger,
    aggregate_train,
    epsilon_after,
    local_noise_multiplier,
    noise_for_epsilon,
    noise_rng,
    train_mods,
    wrap_strategy,
)
from fedrag_ray.federated.protocol import UNIFORM_WEIGHT_KEY
from fedrag_ray.federated.sampling import RoundNodes
from fedrag_ray.federated.secagg import quantisation_error
from fedrag_ray.federated.strategies import build_strategy

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1

GLOBAL = {"a": np.zeros((100, 100), np.float32), "b": np.zeros((50, 200), np.float32)}
DIM = 20_000


def fed_cfg(privacy: dict, num_clients: int = 4):
    return config_from_dict(
        {"federation": {"num_clients": num_clients, "privacy": privacy}}
    ).federation


def direction(seed: int, norm: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = {k: rng.standard_normal(a.shape) for k, a in GLOBAL.items()}
    scale = norm / math.sqrt(sum(float(np.sum(x**2)) for x in v.values()))
    return {k: (x * scale).astype(np.float32) for k, x in v.items()}


def replies_for(messages: list[Message], updates: list[dict[str, np.ndarray]]) -> list[Message]:
    out = []
    for i, (m, u) in enumerate(zip(messages, updates, strict=True)):
        metrics = MetricRecord({"num-examples": 3 + i, "partition-id": i, UNIFORM_WEIGHT_KEY: 1})
        content = RecordDict({"arrays": to_record(u), "metrics": metrics})
        out.append(Message(content, reply_to=m))
    return out


def dp_round(fed, updates, server_round: int = 1):
    ledger = PrivacyLedger(fed)
    strategy = wrap_strategy(build_strategy(fed.strategy, UNIFORM_WEIGHT_KEY), fed, ledger)
    grid = RoundNodes(list(range(10, 10 + len(updates))))
    msgs = list(
        strategy.configure_train(
            server_round, to_record(GLOBAL), ConfigRecord({"server-round": 1}), grid
        )
    )
    with noise_rng(fed.privacy, server_round):
        agg, _ = aggregate_train(strategy, server_round, replies_for(msgs, updates))
    return from_record(agg), ledger, strategy


def flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([arrays[k].ravel().astype(np.float64) for k in sorted(arrays)])


def hand_epsilon(z: float, releases: int, delta: float, orders: list[float]) -> float:
    """RDP of the Gaussian mechanism (sensitivity 1, std z): alpha / (2 z^2) per release;
    to (eps, delta) with the conversion of Canonne-Kamath-Steinke 2020 (Prop. 12 in
    arXiv:2004.00010), minimised over the accountant's orders."""
    best = math.inf
    for a in orders:
        if a > 1.01:
            rdp = releases * a / (2 * z * z)
            best = min(best, rdp + math.log1p(-1 / a) - math.log(delta * a) / (a - 1))
    return max(0.0, best)


def exact_gaussian_epsilon(z: float, delta: float) -> float:
    """The tight eps of one Gaussian release (Balle & Wang 2018), by bisection."""
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731

    def d(eps: float) -> float:
        return phi(1 / (2 * z) - eps * z) - math.exp(eps) * phi(-1 / (2 * z) - eps * z)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


def test_central_dp_bounds_the_aggregate_and_adds_noise_of_the_stated_scale():
    """Flower's server-side fixed-clipping wrapper: 4 clients with updates of norm
    100..400 are clipped to C = 1; the noise on the mean has std z*C/n = 0.125."""
    z, c, n = 0.5, 1.0, 4
    fed = fed_cfg({"mode": "central", "noise_multiplier": z, "clipping_norm": c, "noise_seed": 7})
    updates = [direction(i, 100.0 * (i + 1)) for i in range(n)]
    agg, ledger, _ = dp_round(fed, updates)
    clipped_mean = np.mean([flat(u) * (c / np.linalg.norm(flat(u))) for u in updates], axis=0)
    noise = flat(agg) - clipped_mean
    std = z * c / n
    assert np.std(noise) == pytest.approx(std, rel=0.03)  # 20,000 draws: ~0.5 % error
    assert abs(np.mean(noise)) < 4 * std / math.sqrt(DIM)
    # the update's norm is bounded by C plus the noise, whatever the clients sent
    bound = c + 1.05 * std * math.sqrt(DIM)
    assert np.linalg.norm(flat(agg)) <= bound
    assert np.linalg.norm(np.mean([flat(u) for u in updates], axis=0)) > 5 * bound
    huge, _, _ = dp_round(fed, [direction(i, 1e6) for i in range(n)])
    assert np.linalg.norm(flat(huge)) <= bound
    # same seed, same noise; another seed, other noise
    again, _, _ = dp_round(fed, updates)
    np.testing.assert_array_equal(flat(again), flat(agg))
    other = fed_cfg({"mode": "central", "noise_multiplier": z, "noise_seed": 8})
    assert not np.allclose(flat(dp_round(other, updates)[0]), flat(agg))
    assert ledger.row()["dp_releases"] == 1


def test_epsilon_matches_the_accountant_by_hand_and_grows_with_rounds():
    z, delta = 1.1, 1e-5
    fed = fed_cfg({"mode": "central", "noise_multiplier": z, "delta": delta, "noise_seed": 0})
    _, ledger, strategy = dp_round(fed, [direction(i, 5.0) for i in range(4)])
    orders = ledger.state()["accountant"]["orders"]
    eps1 = ledger.row()["epsilon"]
    assert eps1 == pytest.approx(hand_epsilon(z, 1, delta, orders), rel=1e-9)
    # RDP is a sound upper bound on the exact eps of one Gaussian release, and not loose
    exact = exact_gaussian_epsilon(z, delta)
    assert exact < eps1 < 1.5 * exact
    eps = [eps1]
    for r in (2, 3):  # later releases through the same Flower accountant
        ledger.accountant.compose(GaussianPrivacyEvent(z, 4, 4))
        eps.append(ledger.row()["epsilon"])
        assert eps[-1] == pytest.approx(hand_epsilon(z, r, delta, orders), rel=1e-9)
    assert eps[0] < eps[1] < eps[2]
    summary = ledger.summary(fed)
    assert summary["accountant"].startswith("rdp") and "no-amplification" in summary["sampling"]
    assert summary["noise_std_on_mean"] == pytest.approx(z * 1.0 / 4)


def test_target_epsilon_derives_the_noise_that_spends_it_over_the_rounds():
    z = noise_for_epsilon(2.0, 5, 1e-5)
    assert epsilon_after(z, 5, 1e-5) <= 2.0 < epsilon_after(z * 0.999, 5, 1e-5)
    raw = {"mode": "central", "target_epsilon": 2.0}
    fed = config_from_dict({"federation": {"num_clients": 4, "rounds": 5, "privacy": raw}})
    ledger = PrivacyLedger(fed.federation)
    assert ledger.noise_multiplier == pytest.approx(z) and ledger.derived
    assert ledger.summary(fed.federation)["noise_multiplier_from_target_epsilon"] == 2.0
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier or target_epsilon"):
        fed_cfg({"mode": "central", "target_epsilon": 2.0, "noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="cannot clip"):
        fed_cfg({"mode": "central", "noise_multiplier": 1.0, "secagg": {"enabled": True}})
    with pytest.raises(ConfigError, match="strategy 'fedmedian' is not supported"):
        config_from_dict(
            {
                "federation": {
                    "strategy": {"name": "fedmedian"},
                    "privacy": {"mode": "central", "noise_multiplier": 1.0},
                }
            }
        )


def test_adaptive_clipping_moves_the_norm_towards_the_quantile():
    fed = fed_cfg(
        {
            "mode": "central",
            "adaptive": True,
            "noise_multiplier": 0.5,
            "clipping_norm": 0.1,
            "clipped_count_stddev": 1.0,
            "noise_seed": 3,
        }
    )
    # every update clipped (fraction ~1 > target 0.5): the norm grows, ~e^(0.2 * 0.5)
    _, _, strategy = dp_round(fed, [direction(i, 50.0) for i in range(4)])
    assert 0.1 < strategy.clipping_norm < 0.1 * math.exp(0.2 * 0.5 * 2)
    # none clipped (fraction ~0 < 0.5): it shrinks
    _, _, strategy = dp_round(fed, [direction(i, 0.001) for i in range(4)])
    assert 0.1 * math.exp(-0.2 * 0.5 * 2) < strategy.clipping_norm < 0.1


def test_local_dp_mod_clips_and_noises_every_reply():
    """Flower's LocalDpMod from ``privacy.local_*`` on a ClientApp train handler."""
    privacy = {"mode": "local", "clipping_norm": 1.0, "local_epsilon": 2.0, "delta": 1e-5}
    cfg_json = json.dumps({"federation": {"privacy": privacy}})
    mods = train_mods(cfg_json)
    assert [type(m).__name__ for m in mods] == ["LocalDpMod"]
    update = direction(0, 30.0)
    app = ClientApp()

    @app.train(mods=mods)
    def train(msg: Message, context: Context) -> Message:
        got = from_record(msg.content["arrays"])
        arrays = to_record({k: got[k] + update[k] for k in got})
        metrics = MetricRecord({"num-examples": 4})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    np.random.seed(5)
    msg = Message(
        RecordDict({"arrays": to_record(GLOBAL), "config": ConfigRecord({"server-round": 1})}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    reply = app(msg, Context(1, 7, {"partition-id": 0}, RecordDict(), {}))
    sent = flat(from_record(reply.content["arrays"]))
    clipped = flat(update) / 30.0
    sigma = 1.0 * local_noise_multiplier(
        config_from_dict({"federation": {"privacy": privacy}}).federation.privacy
    )
    assert sigma == pytest.approx(math.sqrt(2 * math.log(1.25 / 1e-5)) / 2.0)
    assert np.std(sent - clipped) == pytest.approx(sigma, rel=0.03)


# ---------------------------------------------------------------- federated, on Ray


def tiny_federated(tmp_path, federation: dict, seed: int = 0) -> dict:

    path = write_pubmedqa_items(tmp_path / "pubmedqa_40.json", 40)
    return {
        "name": "tiny",
        "seed": seed,
        "data": {"path": str(path), "max_train": 16, "max_eval": 4},
        "eval": {"generate": False},
        "generator": {"model": "tiny-random", "max_length": 96},
        "retriever": {"max_length": 64},  # half the embedding work of each index build
        "train": {"method": "ralt", "batch_size": 2, "ralt": {"k": 2}},
        "federation": {
            "num_clients": 4,
            "rounds": 1,
            "local_steps": 1,
            "num_actors": 1,
            **federation,
        },  # one actor: see test_federated.tiny
    }


class RecordingGrid:
    """The server's Grid, recording every reply that server-side code receives."""

    def __init__(self, grid, seen: list[Message]) -> None:
        self._grid, self._seen = grid, seen
        if hasattr(grid, "pull_interval"):
            grid.pull_interval = 0.01

    def send_and_receive(self, messages, *, timeout=None):  # Flower's workflows (SecAgg+)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._seen += replies
        return replies

    def pull_messages(self, message_ids):  # FederatedServer.send_and_receive
        replies = list(self._grid.pull_messages(message_ids))
        self._seen += replies
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


def run_recorded(monkeypatch, cfg: dict, out, **kw):
    from fedrag_ray.federated import run_federated
    from fedrag_ray.federated.server_app import FederatedServer

    seen: list[Message] = []
    original = FederatedServer.run
    monkeypatch.setattr(
        FederatedServer, "run", lambda self, g: original(self, RecordingGrid(g, seen))
    )
    res = run_federated(config_from_dict(cfg), out, **kw)
    monkeypatch.setattr(FederatedServer, "run", original)
    return res, [r for r in seen if r.metadata.message_type == MessageType.TRAIN]


@pytest.mark.timeout(600)
def test_secagg_equals_fedavg_with_a_dropout_and_hides_every_client_adapter(tmp_path, monkeypatch):
    """4 clients, partition 3 fails during training (a dropout after key sharing):
    SecAgg+ recovers its masks and the aggregate of the 3 others equals plain FedAvg's
    within the quantisation error; no client's adapter reaches server-side code."""
    monkeypatch.setenv("FEDRAG_RAY_FAULTS", "raise:3")
    plain, plain_train = run_recorded(monkeypatch, tiny_federated(tmp_path, {}), tmp_path / "p")
    secure_cfg = tiny_federated(tmp_path, {"privacy": {"secagg": {"enabled": True}}})
    secure, secure_train = run_recorded(monkeypatch, secure_cfg, tmp_path / "s")

    for res in (plain, secure):
        h = res["history"][1]
        assert h["succeeded"] == 3 and h["failed"] == 1 and h["aggregated"]
        assert "injected fault in partition 3" in h["failure_reasons"][0]
    # quantisation: one level (2 * clipping_range / 2^22) per client and entry, times
    # max_weight / sum of weights (SecAgg+ scales each update by weight / max_weight)
    weights = [c["num_examples"] for c in plain["history"][1]["clients"]]
    sa = secure["secure_aggregation"]
    assert sa["max_weight"] == 2.0  # local_steps 1 x batch 2: the tightest safe bound
    tol = quantisation_error(config_from_dict(secure_cfg).federation.privacy.secagg, 2.0, weights)
    assert tol < 1e-6
    # LoRA B starts at zero: what it holds now is the aggregated update, far above `tol`
    moved = max(float(np.abs(a).max()) for k, a in plain["final_arrays"].items() if "lora_B" in k)
    assert moved > 100 * tol
    for k, a in plain["final_arrays"].items():
        np.testing.assert_allclose(secure["final_arrays"][k], a, rtol=0, atol=tol + 1e-7, err_msg=k)
    assert secure["secure_aggregation"]["protocol"].startswith("SecAgg+")
    h = secure["history"][1]
    assert h["bytes_received"] > 0 and h["secagg_seconds"] > 0

    # what the server saw: plain FedAvg gets each client's adapter...
    plain_ok = [r for r in plain_train if r.has_content()]
    adapters = [a.data[-256:] for r in plain_ok for a in r.content["arrays"].values()]
    assert len(plain_ok) == 3 and adapters
    # ...SecAgg+ replies carry no array at all, and no client adapter's bytes
    assert len(secure_train) >= 4 * 3  # 4 stages
    wire = b""
    for r in secure_train:
        if r.has_error():
            continue
        for rec in r.content.array_records.values():
            assert len(rec) == 0
        for rec in r.content.config_records.values():
            for v in rec.values():
                vals = v if isinstance(v, list) else [v]
                wire += b"".join(x for x in vals if isinstance(x, bytes))
    assert len(wire) > 100_000
    assert not any(chunk in wire for chunk in adapters)


@pytest.mark.timeout(600)
def test_secagg_with_central_dp_and_a_resumed_privacy_ledger(tmp_path, monkeypatch):
    """SecAgg+ combined with central DP (client-side clipping, Flower's fixedclipping_mod
    inside secaggplus_mod): round 1, then a resume to round 2 continues the ledger."""
    from fedrag_ray.federated import run_federated
    from fedrag_ray.federated.checkpoint import load_checkpoint

    monkeypatch.delenv("FEDRAG_RAY_FAULTS", raising=False)
    z = 1.2
    privacy = {
        "mode": "central",
        "clipping": "client",
        "noise_multiplier": z,
        "clipping_norm": 0.05,
        "noise_seed": 11,
        "secagg": {"enabled": True},
    }
    cfg = tiny_federated(tmp_path, {"num_clients": 3, "privacy": privacy})
    out = tmp_path / "dp"
    first = run_federated(config_from_dict(cfg), out)
    assert first["history"][1]["epsilon"] == pytest.approx(epsilon_after(z, 1, 1e-5), rel=1e-12)
    cfg["federation"]["rounds"] = 2
    res = run_federated(config_from_dict(cfg), out, resume=True)
    assert res["resumed_from_round"] == 1
    eps = [h["epsilon"] for h in res["history"][1:]]
    assert eps == pytest.approx([epsilon_after(z, r, 1e-5) for r in (1, 2)], rel=1e-12)
    assert eps[0] < eps[1]
    ledger = load_checkpoint(out).extra["privacy"]["accountant"]
    assert [c["event"]["noise_multiplier"] for c in ledger["compositions"]] == [z, z]
    saved = json.loads((out / "results.json").read_text())
    p = saved["privacy"]
    assert p["epsilon"] == pytest.approx(eps[-1]) and p["dp_releases"] == 2
    assert p["delta"] == 1e-5 and p["clipping"] == "fixed client-side"
    assert "no-amplification" in p["sampling"] and p["accountant"].startswith("rdp")
    assert saved["secure_aggregation"]["enabled"] is True
    for h in saved["history"][1:]:
        assert h["aggregated"] and h["succeeded"] == 3
        assert h["dp_noise_std"] == pytest.approx(z * 0.05 / 3)
    # the noisy update is bounded: ||mean of clipped updates|| <= C, plus the noise
    assert all(np.isfinite(a).all() for a in res["final_arrays"].values())
    assert (out / "rounds.png").stat().st_size > 1000
