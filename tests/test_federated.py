"""Federated engine, for real: Flower's Ray backend, real Ray actors, real models (tiny)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from shared_data import write_pubmedqa_items

from fedrag_ray.config import apply_overrides, config_from_dict

FEDRAG = [sys.executable, "-m", "fedrag_ray.cli"]


@pytest.fixture(scope="module", autouse=True)
def tiny_data(tmp_path_factory):
    """40 PubMedQA items (~135 passages): small enough to embed in seconds per run."""

    path = write_pubmedqa_items(tmp_path_factory.mktemp("data") / "pubmedqa_40.json", 40)
    TINY_DATA["path"] = str(path)
    return path


TINY_DATA: dict[str, str] = {}


def tiny(federation: dict | None = None, **overrides) -> dict:
    raw = {
        "name": "tiny",
        "data": {"path": TINY_DATA["path"], "max_train": 16, "max_eval": 4},
        "eval": {"generate": False},
        "generator": {"model": "tiny-random", "max_length": 96},
        "retriever": {"max_length": 64},  # half the embedding work of each index build
        "train": {"method": "ralt", "batch_size": 2, "ralt": {"k": 2}},
    }
    if federation is not None:
        # One client actor unless a test asks for more: each actor start imports torch,
        # transformers and peft (~6 s of CPU), and these runs' rounds take under a second.
        # Several actors at once are tested where that is the point (the CLI run, the
        # cluster, served shards, dying actors).
        fed = {"num_clients": 2, "rounds": 2, "local_steps": 1, "num_actors": 1}
        raw["federation"] = {**fed, **federation}
    return apply_overrides(raw, overrides)


def write_yaml(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FEDRAG, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )


@pytest.mark.timeout(900)
def test_simulate_cli_default_config_8_clients_3_rounds(tmp_path, tiny_data):
    """The bundled quick-start config turned to PubMedQA-style labels and RA-DIT (both),
    federated over 8 clients for 3 rounds."""
    out = tmp_path / "run"
    sets = {
        "data.format": "pubmedqa",
        "data.max_articles": "null",
        "train.method": "both",
        "retriever.train": "lora",
        "federation.partition.type": "dirichlet",
        "federation.partition.field": "label",
        "federation.num_clients": 8,
        "federation.clients_per_round": 8,
        "federation.rounds": 3,
        "federation.local_steps": 1,
        "data.path": str(tiny_data),
        "data.max_train": 24,
        "data.max_eval": 6,
        "eval.generate": "false",
        "generator.max_length": 128,
        "generator.model": "tiny-random",
        "retriever.max_length": 64,
    }
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    proc = cli("simulate", "quickstart", "--output", str(out), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rounds = [h for h in res["history"] if h["round"] > 0]
    assert [h["round"] for h in rounds] == [1, 2, 3]
    assert all(h["succeeded"] == 8 and h["failed"] == 0 for h in rounds)
    assert {c["partition-id"] for h in rounds for c in h["clients"]} == set(range(8))
    # `both` + alternate with local_steps 1 alternates on the global step: round 2 is LSR
    assert [sum(c["lsr-steps"] for c in h["clients"]) for h in rounds] == [0, 8, 0]
    # only adapters travel: generator LoRA + query-encoder LoRA, a tiny share of the model
    per_client = rounds[0]["bytes_received"] / 8
    assert 0 < per_client < 0.02 * res["full_model_bytes"]
    assert rounds[0]["bytes_sent"] == rounds[0]["bytes_received"]
    for key in ("recall@5", "mrr", "accuracy"):
        assert key in res["metrics_before"] and key in res["metrics_after"]
    assert all(h["peak_rss_bytes"] > 0 and h["seconds"] > 0 for h in rounds)
    assert (out / "metrics_vs_round.png").stat().st_size > 1000
    assert (out / "rounds.png").stat().st_size > 1000
    assert (out / "story.png").stat().st_size > 1000
    assert (out / "checkpoint" / "meta.json").exists()
    # a virtual client is cheap: fewer actor processes than clients served
    pids = {c["actor-pid"] for h in rounds for c in h["clients"]}
    assert len(pids) <= res["num_actors"] < 8
    assert "round 3" in proc.stderr
    # a quiet console: no library warnings or per-actor loading bars between the rounds
    noise = [ln for ln in proc.stderr.splitlines() if "Warning" in ln or "Loading weights" in ln]
    assert not noise, noise[:5]
    # the driver never loads a model: index build and evaluation ran on a client actor
    assert res["driver_imported_torch"] is False
    assert res["timings"]["index_s"] > 0 and res["timings"]["prepare_s"] > 0


@pytest.mark.timeout(900)
def test_one_client_one_round_equals_one_centralized_epoch(tmp_path):
    """Adding only `federation:` turns the experiment federated; with 1 client and 1 round
    the global update equals one centralized epoch (same local step functions)."""
    from fedrag_ray.centralized import run_centralized
    from fedrag_ray.federated import run_federated

    base = tiny(**{"train.method": "both", "retriever.train": "lora", "data.max_train": 8})
    central = run_centralized(config_from_dict(base))
    fed_raw = dict(base, federation={"num_clients": 1, "rounds": 1, "local_epochs": 1})
    # eval.before off: round 0 is logged unevaluated, and no paired gain is claimed
    fed_raw = apply_overrides(fed_raw, {"eval.before": False})
    federated = run_federated(config_from_dict(fed_raw), tmp_path / "fed")
    assert [h["round"] for h in federated["history"]] == [0, 1]
    assert "recall@5" not in federated["history"][0] and "recall@5" in federated["history"][1]
    assert federated["metrics_before"] == {} and federated["gain"] == {}

    c_state = central["system"].trainable_state()
    f_state = federated["final_arrays"]
    assert set(c_state) == set(f_state)
    assert any(k.startswith("retriever.") for k in c_state)
    assert any(k.startswith("generator.") for k in c_state)
    init = config_from_dict(base)
    from fedrag_ray.rag import RAGSystem

    start = RAGSystem(init).trainable_state()
    moved = sum(float(np.abs(c_state[k] - start[k]).sum()) for k in c_state)
    assert moved > 0, "training did not change anything: the comparison would be vacuous"
    # The driver and the Ray actor run torch with different thread counts, so matmul
    # reductions differ in the last bits; Adam turns that into visible differences only where a
    # gradient is ~0 (m/sqrt(v) is then unstable), and each step is bounded by the lr. So: nearly
    # every element agrees tightly, and none differs by more than a tenth of one Adam step
    # (a missing or extra step would move almost every element by ~lr).
    for k in c_state:
        lr = init.train.retriever_lr if k.startswith("retriever.") else init.train.lr
        diff = np.abs(f_state[k] - c_state[k])
        loose = diff > 1e-6 + 1e-4 * np.abs(c_state[k])
        assert loose.mean() <= 1e-3, (k, int(loose.sum()), diff.size)
        assert diff.max() <= 0.1 * lr, (k, float(diff.max()), lr)
    assert central["steps"] == federated["history"][1]["clients"][0]["steps"]


@pytest.mark.timeout(600)
def test_client_reply_carries_only_parameter_arrays_and_scalars(tmp_path):
    """Privacy by construction: no text, questions or document embeddings leave a client."""
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.supercore.task_identity import TaskIdentity

    from fedrag_ray.data import load_dataset_from_config
    from fedrag_ray.federated.client_app import make_client_app
    from fedrag_ray.federated.params import to_record
    from fedrag_ray.federated.protocol import EXAMPLE_IDS_KEY, SERVER_ROUND_KEY
    from fedrag_ray.federated.sampling import client_partitions, encode_example_ids
    from fedrag_ray.federated.simulation import build_client_shards
    from fedrag_ray.rag import RAGSystem

    raw = tiny(
        {"num_clients": 2, "knowledge": "private"},
        **{"train.method": "both", "retriever.train": "lora"},
    )
    cfg = config_from_dict(raw)
    data = load_dataset_from_config(cfg.data)
    system = RAGSystem(cfg)
    store = system.build_store(data.passages)
    store.save(tmp_path / "global")
    assert build_client_shards(cfg, data, store, tmp_path) == 2

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    app = make_client_app(cfg.model_dump_json(), str(tmp_path))
    mine = [data.train[i] for i in client_partitions(cfg, data.train)[1]]
    config = {
        SERVER_ROUND_KEY: 1,
        EXAMPLE_IDS_KEY: encode_example_ids(client_partitions(cfg, data.train)[1]),
    }
    msg = Message(
        RecordDict(
            {
                "arrays": to_record(system.trainable_state()),
                "config": ConfigRecord(config),
            }
        ),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    ctx = Context(1, 7, {"partition-id": 1, "num-partitions": 2}, RecordDict(), {})
    reply = app(msg, ctx)

    assert set(reply.content.keys()) == {"arrays", "metrics"}
    arrays, metrics = reply.content["arrays"], reply.content["metrics"]
    assert isinstance(arrays, ArrayRecord) and isinstance(metrics, MetricRecord)
    assert set(arrays.keys()) == set(system.trainable_parameters())
    assert all("lora_" in k for k in arrays.keys())  # adapters only, no embeddings
    ranks = {cfg.generator.lora.r, cfg.retriever.lora_r}
    for a in arrays.values():
        # LoRA factors are r x d or d x r: no row per document or per question
        assert a.dtype == "float32" and len(a.shape) == 2 and min(a.shape) in ranks
    assert all(isinstance(v, int | float) for v in metrics.values())
    # nothing the client holds as text appears anywhere in the serialised reply
    wire = b"".join(a.data for a in arrays.values()) + repr(dict(metrics)).encode()
    for ex in mine:
        assert ex.question.encode() not in wire


def _fault_config(tmp_path: Path) -> dict:
    # as many actors as fit (2 here): a dying actor is replaced while the other serves
    return tiny({"num_clients": 4, "rounds": 3, "min_successes": 1, "num_actors": None})


@pytest.mark.timeout(900)
def test_raising_and_dying_clients_do_not_stop_the_run(tmp_path):
    """Chaos knob in the environment of a fresh `fedrag-ray simulate` process, as a user
    would set it: partition 1 raises every round, partition 2's actor dies in round 2."""
    cfg_path = write_yaml(tmp_path / "exp.yaml", _fault_config(tmp_path))
    env = {**os.environ, "FEDRAG_RAY_FAULTS": "raise:1,kill:2@2"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [*FEDRAG, "simulate", str(cfg_path), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=800,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    rounds = {h["round"]: h for h in res["history"] if h["round"] > 0}
    assert rounds[1]["succeeded"] == 3 and rounds[1]["failed"] == 1
    assert rounds[2]["succeeded"] == 2 and rounds[2]["failed"] == 2  # raise + killed actor
    # the dead actor was replaced: round 3 serves all three healthy clients again
    assert rounds[3]["succeeded"] == 3 and rounds[3]["failed"] == 1
    assert {c["partition-id"] for c in rounds[3]["clients"]} == {0, 2, 3}
    assert all(r["aggregated"] for r in rounds.values())
    assert res["failures"] == 4


def _kill_tree(pid: int) -> None:
    parent = psutil.Process(pid)
    procs = [*parent.children(recursive=True), parent]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@contextlib.contextmanager
def reference_run(cfg_path: Path, run_dir: Path, timeout: int = 600) -> Iterator[None]:
    """``fedrag-ray simulate`` into ``run_dir`` in the background for the ``with`` body,
    then waited for: it must succeed. A resume test runs its uninterrupted reference this
    way beside the killed and the resumed run: each run spends much of its time waiting
    on Ray and actor start-up, so they overlap well. Its console goes to ``run_dir``.log
    (an unread pipe would fill and stall it); it is killed if the body fails."""
    with open(run_dir.with_suffix(".log"), "w") as log:  # the child keeps its own copy
        proc = subprocess.Popen(
            [*FEDRAG, "simulate", str(cfg_path), "--output", str(run_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    try:
        yield
    except BaseException:
        _kill_tree(proc.pid)
        raise
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, run_dir.with_suffix(".log").read_text()[-3000:]


def kill_after_first_checkpoint(cfg_path: Path, run_dir: Path) -> dict:
    """Start ``fedrag-ray simulate`` into ``run_dir``, SIGKILL its whole process tree once
    a checkpoint of round (or update) >= 1 exists, and return that checkpoint's meta."""
    p = subprocess.Popen(
        [*FEDRAG, "simulate", str(cfg_path), "--output", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ.copy(),
    )
    meta = run_dir / "checkpoint" / "meta.json"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if meta.exists() and json.loads(meta.read_text())["round"] >= 1:
            break
        time.sleep(0.1)
    assert p.poll() is None, "run finished before it could be killed"
    _kill_tree(p.pid)
    return json.loads(meta.read_text())


@pytest.mark.timeout(1200)
def test_killed_driver_resumes_to_the_same_final_metrics(tmp_path):
    raw = tiny({"num_clients": 3, "clients_per_round": 2, "rounds": 3}, seed=3)
    raw["federation"]["strategy"] = {"name": "fedadam", "eta": 0.01}  # stateful strategy
    cfg_path = write_yaml(tmp_path / "exp.yaml", raw)

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    with reference_run(cfg_path, straight):
        killed_at = kill_after_first_checkpoint(cfg_path, crashed)["round"]
        assert killed_at < 3
        assert not (crashed / "results.json").exists()

        proc = cli("simulate", str(cfg_path), "--resume", str(crashed))
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = json.loads((straight / "results.json").read_text())
    b = json.loads((crashed / "results.json").read_text())
    assert b["resumed_from_round"] == killed_at
    assert [h["round"] for h in b["history"]] == [0, 1, 2, 3]
    assert a["metrics_after"] == pytest.approx(b["metrics_after"], abs=1e-9, nan_ok=True)
    sa, sb = np.load(straight / "trainable_state.npz"), np.load(crashed / "trainable_state.npz")
    for k in sa.files:
        np.testing.assert_allclose(sa[k], sb[k], rtol=1e-6, atol=1e-8, err_msg=k)
    # history of the rounds both runs trained is identical too
    for ha, hb in zip(a["history"][1:], b["history"][1:], strict=True):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-6)
        assert len(ha["clients"]) == len(hb["clients"]) == 2
        for ca, cb in zip(ha["clients"], hb["clients"], strict=True):
            assert _same_run_figures(ca) == pytest.approx(_same_run_figures(cb), rel=1e-6)
    # the checkpoint holds no history; the log beside it has every round exactly once
    from fedrag_ray.federated.checkpoint import load_checkpoint

    ckpt = load_checkpoint(crashed)
    assert ckpt.round == 3 and not hasattr(ckpt, "history")
    rows = [json.loads(line) for line in (crashed / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    clients = [json.loads(c) for c in (crashed / "clients.jsonl").read_text().splitlines()]
    assert [c["round"] for c in clients] == [1, 1, 2, 2, 3, 3]


def _same_run_figures(client: dict) -> dict:
    """A client's metrics without those that differ between processes (pid, timings)."""
    return {k: v for k, v in client.items() if not k.startswith("actor-") and "seconds" not in k}


def test_run_log_drops_rows_past_the_checkpoint_and_a_torn_line(tmp_path):
    """A kill between a round's log append and its checkpoint (or mid-append) leaves rows
    the checkpoint does not know: a resume cuts the log back to the checkpoint's round."""
    from fedrag_ray.federated.checkpoint import RunLog

    log = RunLog(tmp_path)
    log.append({"round": 0, "accuracy": 0.25, "seconds": 1.0})
    for r in (1, 2):
        log.append({"round": r, "train_loss": 1.0 / r, "clients": [{"partition-id": r}]})
    with open(log.history_path, "a") as f:
        f.write('{"round": 3, "train_lo')  # torn by the kill
    rows = log.load(upto_round=1)
    assert rows == [
        {"round": 0, "accuracy": 0.25, "seconds": 1.0},
        {"round": 1, "train_loss": 1.0, "clients": [{"partition-id": 1}]},
    ]
    assert len(log.history_path.read_text().splitlines()) == 2
    assert log.clients_path.read_text() == '{"round": 1, "partition-id": 1}\n'
    log.append({"round": 2, "train_loss": 0.5, "clients": []})
    assert [r["round"] for r in log.load(upto_round=2)] == [0, 1, 2]


def test_resume_refuses_a_different_experiment(tmp_path):
    from fedrag_ray.federated.checkpoint import (
        CheckpointError,
        RoundCheckpoint,
        config_fingerprint,
        load_checkpoint,
        save_checkpoint,
    )

    cfg = config_from_dict(tiny({"num_clients": 2}))
    fp = config_fingerprint(cfg.model_dump_json())
    save_checkpoint(tmp_path, RoundCheckpoint(1, {"w": np.ones(2)}, {}, fp))
    assert load_checkpoint(tmp_path, fp).round == 1
    more_rounds = config_from_dict(tiny({"num_clients": 2, "rounds": 9}))
    assert config_fingerprint(more_rounds.model_dump_json()) == fp
    other = config_from_dict(tiny({"num_clients": 2}, **{"train.lr": 0.5}))
    with pytest.raises(CheckpointError, match="different experiment"):
        load_checkpoint(tmp_path, config_fingerprint(other.model_dump_json()))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_flower_backend_hooks_still_exist():
    """fedrag_ray patches private Flower APIs: fail loudly if an upgrade moves them."""
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from flwr.simulation.ray_transport import ray_actor

    from fedrag_ray.federated.ray_backend import FLWR_VERSION, FedRagRayBackend, fedrag_backend

    assert flwr.__version__ == FLWR_VERSION
    assert hasattr(ray_actor, "BasicActorPool") and hasattr(ray_actor, "ClientAppActor")
    assert "RayBackend(backend_config)" in Path(vce_api.__file__).read_text()
    with fedrag_backend():
        assert raybackend.RayBackend is FedRagRayBackend
    assert raybackend.RayBackend is not FedRagRayBackend


def test_server_task_moves_to_the_next_node_when_an_actor_fails():
    """prepare/evaluate run on a client actor: an error reply from one node sends the task
    to the next node; when every node tried fails, the error names the task and reasons."""
    from flwr.app import Error, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedrag_ray.federated.server_app import SERVER_TASK_TRIES, FederatedServer

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1

    class Grid:
        def __init__(self, failing: set[int]) -> None:
            self.failing, self.sent = failing, []

        def send_and_receive(self, messages, timeout=None):
            for m in messages:
                self.sent.append((m.metadata.dst_node_id, str(m.content["config"]["task"])))
                if m.metadata.dst_node_id in self.failing:
                    yield Message(
                        Error(code=0, reason=f"actor on {m.metadata.dst_node_id} died"), reply_to=m
                    )
                else:
                    metrics = MetricRecord({"recall@5": 0.5, "n": 4.0})
                    yield Message(RecordDict({"metrics": metrics}), reply_to=m)

    cfg = config_from_dict(tiny({"num_clients": 4}))
    server = FederatedServer(cfg, cfg.model_dump_json(), "/nonexistent")
    server.task_nodes = [11, 12, 13, 14]
    grid = Grid(failing={11})
    arrays = {"generator.w": np.zeros((2, 2), np.float32)}
    assert server.evaluate(grid, arrays) == {"recall@5": 0.5, "n": 4.0, "per_question": {}}
    assert grid.sent == [(11, "evaluate"), (12, "evaluate")]

    grid = Grid(failing={11, 12, 13, 14})
    with pytest.raises(RuntimeError, match="'evaluate' failed.*actor on 11 died"):
        server.evaluate(grid, arrays)
    assert [n for n, _ in grid.sent] == [11, 12, 13, 14][:SERVER_TASK_TRIES]


def test_arrays_decode_without_np_load_exactly_as_flower_does():
    """params.to_numpy skips np.load's header parsing for C-ordered arrays; Fortran-ordered,
    boolean, empty and 0-d arrays must come back exactly as Array.numpy() gives them."""
    from flwr.app import Array

    from fedrag_ray.federated.params import from_record, to_numpy, to_record

    state = {"a": np.random.default_rng(0).random((8, 64), dtype=np.float32)}
    assert np.array_equal(from_record(to_record(state))["a"], state["a"])
    for value in (
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.array([[True, False]]),
        np.zeros((0, 4), np.float32),
        np.array(3.5),
        np.arange(6, dtype=np.int64).reshape(2, 3),
    ):
        array = Array(value)
        got, want = to_numpy(array), array.numpy()
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want)
        got[...] = 0  # writable, and not a view of the record's bytes
        assert np.array_equal(array.numpy(), value)


def test_records_carry_arrays_that_the_strategy_decodes_without_np_load(monkeypatch):
    """to_record's arrays stay WireArray through a pickle (the Ray hop back from an actor)
    and through Flower's FedAvg, which then never calls np.load; the aggregate equals the
    weighted mean of the plain decodes."""
    import pickle

    from flwr.app import Array, Message, Metadata, MetricRecord, RecordDict
    from flwr.app.message.message import make_message
    from flwr.serverapp.strategy import FedAvg

    from fedrag_ray.federated.params import WireArray, from_record, to_record
    from fedrag_ray.federated.protocol import ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY

    rng = np.random.default_rng(1)
    states = [{"a": rng.random((4, 3), dtype=np.float32)} for _ in range(3)]
    replies: list[Message] = []
    for i, state in enumerate(states):
        md = Metadata(
            run_id=1, message_id="", src_node_id=i + 1, dst_node_id=0,
            reply_to_message_id="m", group_id="1", created_at=0.0, ttl=60.0,
            message_type="train",
        )  # fmt: skip
        content = RecordDict(
            {ARRAYS_KEY: to_record(state), METRICS_KEY: MetricRecord({WEIGHT_KEY: i + 1})}
        )
        replies.append(pickle.loads(pickle.dumps(make_message(md, content))))
    assert all(isinstance(r.content[ARRAYS_KEY]["a"], WireArray) for r in replies)
    assert np.array_equal(
        replies[0].content[ARRAYS_KEY]["a"].numpy(),
        Array.numpy(replies[0].content[ARRAYS_KEY]["a"]),
    )

    def no_load(*args, **kwargs):
        raise AssertionError("np.load called")

    monkeypatch.setattr(np, "load", no_load)
    arrays, _ = FedAvg().aggregate_train(1, replies)
    want = sum((i + 1) * s["a"].astype(np.float64) for i, s in enumerate(states)) / 6
    np.testing.assert_allclose(from_record(arrays)["a"], want, rtol=1e-6)


@pytest.mark.timeout(900)
def test_resume_with_more_rounds_keeps_the_original_lr_schedule(tmp_path):
    """A run of 2 rounds resumed with ``rounds: 3`` is the 2-round run plus a round at the
    end of its schedule: the cosine schedule spans the rounds the run was started with
    (recorded in the checkpoint), not the new count, which used to re-stretch it from
    the resume point. Each client reports the LR of its first local step."""
    from fedrag_ray.federated import run_federated

    raw = tiny({"num_clients": 2, "rounds": 2})
    cfg = config_from_dict(raw)
    lr, low = cfg.train.lr, cfg.train.min_lr_ratio
    filters, np_state = list(warnings.filters), np.random.get_state()
    first = run_federated(cfg, tmp_path, num_cpus=2)
    # a library call: the caller's warning filters and global RNG are as they were
    assert warnings.filters == filters
    assert all(np.array_equal(a, b) for a, b in zip(np_state, np.random.get_state(), strict=True))
    lrs = [[c["lr"] for c in h["clients"]] for h in first["history"][1:]]
    # one local step per round, schedule over 2 steps: cos at progress 0 and 1/2
    assert lrs == [[pytest.approx(lr)] * 2, [pytest.approx(lr * (low + (1 - low) * 0.5))] * 2]
    more = config_from_dict(apply_overrides(raw, {"federation.rounds": 3}))
    resumed = run_federated(more, tmp_path, resume=True, num_cpus=2)
    assert resumed["resumed_from_round"] == 2
    assert [c["lr"] for c in resumed["history"][3]["clients"]] == [pytest.approx(lr * low)] * 2


@pytest.mark.timeout(900)
def test_quickstart_on_squad_reports_the_gain_with_its_interval(tmp_path):
    """The bundled quick start as it ships (SQuAD, clients by article), shrunk: every
    metric has its 95% interval, the gain is the paired difference on the same questions,
    and the console says whether it excludes 0."""
    out = tmp_path / "run"
    sets = {
        "data.max_articles": 6,
        "data.max_train": 16,
        "data.max_eval": 12,
        "federation.rounds": 1,
        "federation.local_steps": 1,
        "federation.eval_every": 1,
        "generator.model": "tiny-random",
        "generator.max_length": 128,
        "rag.max_new_tokens": 4,
    }
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    proc = cli("simulate", "quickstart", "--output", str(out), *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    before, after, gain = res["metrics_before"], res["metrics_after"], res["gain"]
    for key in ("exact_match", "f1", "recall@1", "recall@5", "mrr"):
        assert before[f"{key}_lo"] <= before[key] <= before[f"{key}_hi"]
        assert after[f"{key}_lo"] <= after[key] <= after[f"{key}_hi"]
        g = gain[key]
        assert g["n"] == 12 and g["lo"] <= g["mean"] <= g["hi"]
        assert g["mean"] == pytest.approx(after[key] - before[key])
    # the retriever is not trained by RALT: retrieval is identical, the gain exactly 0
    assert gain["recall@5"] == {**gain["recall@5"], "mean": 0.0, "lo": 0.0, "hi": 0.0}
    per_q = res["history"][-1]["per_question"]
    assert len(per_q["exact_match"]) == 12
    err = " ".join(proc.stderr.split())
    assert "exact_match gain" in err and "interval" in err
