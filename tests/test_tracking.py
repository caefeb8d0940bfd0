"""Tracking for real: `train` and `simulate` runs logged to a local MLflow file store and
TensorBoard event files; a federated run keeps every round for `export --round`."""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
from shared_data import write_pubmedqa_items

from fedrag_ray.centralized import run_centralized
from fedrag_ray.config import config_from_dict
from fedrag_ray.export import ExportError, export_run, resolve_run


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_pubmedqa_items(tmp_path_factory.mktemp("data") / "pqa_20.json", 20)


def tiny_raw(data_path, tracking: dict, **extra) -> dict:
    return {
        "name": "tiny-tracked",
        "seed": 2,
        "data": {"path": str(data_path), "max_train": 8, "max_eval": 2},
        "retriever": {"max_length": 64},
        "generator": {"model": "tiny-random", "max_length": 64},
        "rag": {"max_new_tokens": 4},
        "eval": {"generate": False, "closed_book": False},
        "train": {"method": "ralt", "batch_size": 2, "lr": 5e-2, "ralt": {"k": 1}},
        "tracking": tracking,
        **extra,
    }


def mlflow_client(uri: str):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Scalars from the TFRecord event files (length, crc, Event proto, crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_train_logged_to_mlflow_file_store_and_tensorboard(tmp_path, data_path):
    uri = (tmp_path / "mlruns").as_uri()
    cfg = config_from_dict(
        tiny_raw(data_path, {"mlflow_uri": uri, "tensorboard": True, "run_name": "central"})
    )
    res = run_centralized(cfg, tmp_path / "run")
    client = mlflow_client(uri)
    run = client.get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "central"
    assert run.data.tags["fedrag_ray.mode"] == "centralized"
    # params: the config, dotted
    assert run.data.params["train.lr"] == "0.05" and run.data.params["train.method"] == "ralt"
    assert run.data.params["generator.lora.target_modules"] == '["q_proj", "v_proj"]'
    # per-step loss, exactly the run's loss history
    hist = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in hist] == [1, 2, 3, 4]
    assert [m.value for m in hist] == pytest.approx(res["loss_history"])
    # evaluation before (step 0) and after (last step); '@' is not allowed in MLflow names
    recall = client.get_metric_history(run.info.run_id, "recall_at_5")
    assert [(m.step, m.value) for m in recall] == [
        (0, pytest.approx(res["metrics_before"]["recall@5"])),
        (4, pytest.approx(res["metrics_after"]["recall@5"])),
    ]
    assert "time/train_s" in run.data.metrics
    # artifacts: results, plot and the exported model (PEFT adapter + sentence-transformers)
    arts = artifact_paths(client, run.info.run_id)
    assert {"results.json", "loss_curve.png"} <= arts
    assert {
        "model/generator/adapter_config.json",
        "model/generator/adapter_model.safetensors",
        "model/query_encoder/modules.json",
        "model/fedrag_export.json",
    } <= arts
    local = client.download_artifacts(run.info.run_id, "results.json", str(tmp_path / "dl"))
    assert json.loads(open(local).read())["loss_history"] == res["loss_history"]
    # TensorBoard got the same per-step scalars
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in scalars["train_loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train_loss"]] == pytest.approx(res["loss_history"], rel=1e-6)
    assert [s for s, _ in scalars["recall_at_5"]] == [0, 4]


def test_failed_run_is_marked_failed(tmp_path, data_path):
    uri = (tmp_path / "mlruns").as_uri()
    raw = tiny_raw(data_path, {"mlflow_uri": uri, "mlflow_experiment": "failing"})
    raw["data"]["path"] = str(tmp_path / "missing.json")
    with pytest.raises(Exception, match="missing.json"):
        run_centralized(config_from_dict(raw), tmp_path / "run")
    client = mlflow_client(uri)
    exp = client.get_experiment_by_name("failing")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_tracking_does_not_change_the_resume_fingerprint():
    from fedrag_ray.federated.checkpoint import config_fingerprint

    a = config_from_dict({"federation": {"num_clients": 2}})
    b = config_from_dict(
        {
            "federation": {"num_clients": 2},
            "tracking": {"mlflow_uri": "file:/x", "keep_rounds": True},
        }
    )
    assert config_fingerprint(a.model_dump_json()) == config_fingerprint(b.model_dump_json())


def test_unknown_tracking_field_is_rejected():
    from fedrag_ray.config import ConfigError

    with pytest.raises(ConfigError, match="tracking.mlflow_url: unknown field"):
        config_from_dict({"tracking": {"mlflow_url": "file:/x"}})


@pytest.mark.timeout(600)
def test_simulate_logs_rounds_and_keeps_every_round_for_export(tmp_path, data_path):
    from fedrag_ray.federated import run_federated

    uri = (tmp_path / "mlruns").as_uri()
    raw = tiny_raw(
        data_path,
        {"mlflow_uri": uri, "keep_rounds": True},
        federation={"num_clients": 2, "rounds": 2, "local_steps": 2, "num_actors": 1},
    )
    rows = []
    res = run_federated(config_from_dict(raw), tmp_path / "fed", on_round=rows.append)
    assert [r["round"] for r in rows] == [0, 1, 2]  # the caller's callback still runs
    client = mlflow_client(uri)
    run = client.get_run(res["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["fedrag_ray.mode"] == "federated"
    assert run.data.params["federation.num_clients"] == "2"
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in loss] == [
        (h["round"], pytest.approx(h["train_loss"])) for h in res["history"][1:]
    ]
    acc = client.get_metric_history(run.info.run_id, "accuracy")
    assert [m.step for m in acc] == [0, 1, 2]
    arts = artifact_paths(client, run.info.run_id)
    assert {
        "results.json",
        "metrics_vs_round.png",
        "model/generator/adapter_model.safetensors",
    } <= (arts)

    # every round's global model is kept; the last one is the final state
    fed = tmp_path / "fed"
    r1, r2 = (dict(np.load(fed / "rounds" / f"round_000{i}.npz")) for i in (1, 2))
    final = dict(np.load(fed / "trainable_state.npz"))
    assert r2.keys() == final.keys() and all(np.array_equal(r2[k], final[k]) for k in final)
    assert any(not np.array_equal(r1[k], r2[k]) for k in r1)
    src = resolve_run(fed, server_round=1)
    assert src.kind == "federated" and src.round == 1
    assert all(np.array_equal(src.state[k], r1[k]) for k in r1)
    manifest = export_run(fed, tmp_path / "export_r1", server_round=1, store=False)
    assert manifest["source"]["round"] == 1
    from safetensors.numpy import load_file

    adapter = load_file(str(tmp_path / "export_r1" / "generator" / "adapter_model.safetensors"))
    for k, v in r1.items():
        np.testing.assert_array_equal(adapter[k[len("generator.") :].replace(".default", "")], v)
    assert resolve_run(fed).round == 2

    # a round that was not kept is a clear error naming the fix
    copy = tmp_path / "copy"
    shutil.copytree(fed, copy, ignore=shutil.ignore_patterns("stores", "export"))
    (copy / "rounds" / "round_0001.npz").unlink()
    with pytest.raises(ExportError, match="kept: \\[2\\].*tracking.keep_rounds=true"):
        resolve_run(copy, server_round=1)
    assert resolve_run(copy, server_round=2).round == 2  # still in the checkpoint


@pytest.mark.timeout(900)
def test_default_tracking_keeps_the_model_out_of_the_federated_driver(tmp_path, data_path):
    """With MLflow and ``log_model`` (on by default) the exported model is still logged,
    but the driver of a federated run never imports torch: the export runs in a child
    process. It used to run in the driver, after the run."""
    import subprocess
    import sys

    uri = (tmp_path / "mlruns").as_uri()
    raw = tiny_raw(
        data_path,
        {"mlflow_uri": uri},
        federation={"num_clients": 2, "rounds": 1, "local_steps": 1, "num_actors": 1},
    )
    script = (
        "import json, sys\n"
        "from fedrag_ray.config import config_from_dict\n"
        "from fedrag_ray.federated import run_federated\n"
        "res = run_federated(config_from_dict(json.loads(sys.argv[1])), sys.argv[2], num_cpus=2)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'run': res['mlflow_run_id']}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(raw), str(tmp_path / "fed")],
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["torch"] is False
    arts = artifact_paths(mlflow_client(uri), out["run"])
    assert "model/generator/adapter_model.safetensors" in arts
    assert "model/query_encoder/modules.json" in arts
