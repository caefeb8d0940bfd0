"""Knowledge on a real two-node Ray cluster on this machine: the global index served by
shard actors on both nodes during a federated run, and a node that cannot read the store
root stopping the run before round 1, named.

The worker node is started in its own mount namespace (``unshare -m``) where one
directory, ``ROOT/hidden``, is an empty tmpfs: a faithful stand-in for a node without the
driver's shared filesystem. Everything else (Ray's sockets, the other paths) is shared.
The cluster helpers are those of ``test_cluster_run``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from test_cluster_run import (
    NODE_ARGS,
    RAY,
    _free_port,
    _run,
    _stop_processes_under,
    assert_cluster_intact,
    cluster_nodes,
    simulate,
    small_pubmedqa,
)


def _hidden_worker_cmd(root: str, address: str) -> list[str]:
    start = " ".join(
        [
            RAY,
            "start",
            f"--address={address}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--temp-dir={root}/worker",
            *(f"'{a}'" for a in NODE_ARGS),
        ]
    )
    script = f"mount -t tmpfs tmpfs {root}/hidden && exec {start}"
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script]


@pytest.fixture(scope="module")
def hidden_cluster(fedrag_cache):
    """Head + one worker (in its own mount namespace), torn down at module end."""
    assert shutil.which("unshare"), (
        "needs util-linux unshare (and CAP_SYS_ADMIN) for the mount namespace"
    )
    root = tempfile.mkdtemp(prefix="frk", dir="/tmp")
    (Path(root) / "hidden").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_TMPDIR=root,
        RAY_USAGE_STATS_ENABLED="0",
        FEDRAG_RAY_CACHE=str(fedrag_cache),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        FLWR_TELEMETRY_ENABLED="0",
    )
    port = _free_port()
    address = f"127.0.0.1:{port}"
    try:
        head = _run(
            [
                RAY,
                "start",
                "--head",
                f"--port={port}",
                "--include-dashboard=false",
                f"--dashboard-port={_free_port()}",
                f"--ray-client-server-port={_free_port()}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--temp-dir={root}/head",
                *NODE_ARGS,
            ],
            env,
            timeout=240,
        )
        assert head.returncode == 0, f"ray start --head failed:\n{head.stdout}\n{head.stderr}"
        worker = _run(_hidden_worker_cmd(root, address), env, timeout=240)
        assert worker.returncode == 0, f"worker failed:\n{worker.stdout}\n{worker.stderr}"
        deadline = time.monotonic() + 120
        while True:
            nodes = [n for n in cluster_nodes(address, env) if n["Alive"]]
            if len(nodes) == 2 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert len(nodes) == 2, f"expected 2 alive Ray nodes, got {nodes}"
        head_id = next(n["NodeID"] for n in nodes if "node:__internal_head__" in n["Resources"])
        yield {
            "address": address,
            "env": env,
            "root": root,
            "node_ids": {n["NodeID"] for n in nodes},
            "head_id": head_id,
            "worker_id": next(n["NodeID"] for n in nodes if n["NodeID"] != head_id),
        }
    finally:
        _stop_processes_under(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def served_config(tmp_path_factory) -> Path:
    raw = {
        "name": "cluster-served",
        "data": {"path": small_pubmedqa(tmp_path_factory), "max_train": 16, "max_eval": 4},
        "eval": {"generate": False, "closed_book": False},
        "generator": {"model": "tiny-random", "max_length": 96},
        "retriever": {"max_length": 64},  # half the embedding work of each index build
        "train": {"method": "ralt", "batch_size": 2, "ralt": {"k": 2}},
        "knowledge_store": {"serve": "actors", "n_shards": 2},
        "federation": {
            "num_clients": 4,
            "rounds": 1,
            "local_steps": 1,
            "client_resources": {"num_cpus": 1, "custom": {"client_slot": 1}},
        },
    }
    path = tmp_path_factory.mktemp("cluster_cfg") / "served.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.timeout(600)
def test_round_with_shard_actors_on_both_nodes(hidden_cluster, served_config, tmp_path):
    out = tmp_path / "run"
    proc, seconds = simulate(hidden_cluster, served_config, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert {s["node_id"] for s in res["shard_actors"]} == hidden_cluster["node_ids"]
    assert set(res["actor_nodes"]) == hidden_cluster["node_ids"]  # clients on both too
    assert res["store_root_nodes_checked"] == 2
    rounds = [h for h in res["history"] if h["round"] > 0]
    assert rounds[0]["succeeded"] == 4 and res["failures"] == 0
    assert res["history"][0]["recall@5"] >= 0.0  # server evaluation searched the shards
    assert_cluster_intact(hidden_cluster)
    print(f"served two-node round: {seconds:.1f}s, shard actors {res['shard_actors']}")


@pytest.mark.timeout(300)
def test_unreadable_store_root_on_a_node_stops_before_round_1(
    hidden_cluster, served_config, tmp_path
):
    out = tmp_path / "run"
    stores = Path(hidden_cluster["root"]) / "hidden" / "stores"
    proc, seconds = simulate(
        hidden_cluster, served_config, out, f"federation.shard_dir={stores}", timeout=240
    )
    stderr = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    worker, head = hidden_cluster["worker_id"][:12], hidden_cluster["head_id"][:12]
    assert f"Ray node {worker}) cannot read {stores}" in stderr, stderr[-2000:]
    assert f"Ray node {head}" not in stderr  # the head reads it: only the worker is named
    # before any model or index work, and before round 1
    assert not (stores / "global").exists()
    assert not (out / "results.json").exists()
    assert_cluster_intact(hidden_cluster)
    print(f"unreadable store root: exit 2 after {seconds:.1f}s")
