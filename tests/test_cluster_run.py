"""A real two-node Ray cluster on this machine, and `fedrag-ray simulate --address` on it.

The fixture starts a head and a worker with the venv's own ``ray start`` (two raylets, two
GCS-registered nodes, each declaring ``CPU: 1`` and ``{"client_slot": 1}``), exactly as
``clusters/README.md`` tells on-prem users to. The CLI then joins it as an external driver
(``ray.init(address=HOST:PORT)``). Client actors ask for ``num_cpus: 1`` plus
``client_slot: 1``, so each node fits exactly one actor and a correct run must use both.

Isolation from other Ray users of this (shared) machine:

* every node gets its own ``--temp-dir`` under one private root, and ``RAY_TMPDIR`` points
  there too, so ``ray start`` records the cluster address in the private root instead of
  ``/tmp/ray/ray_current_cluster`` (an embedded ``ray.init()`` elsewhere would otherwise
  attach to this cluster);
* every port is picked free (GCS, client server, dashboard, dashboard agent; workers and
  managers get random ports);
* teardown never runs ``ray stop`` (it kills every Ray process of the user): it ends only
  the processes whose command line names the private root, and their children, by pid.

Ray 2.55 advertises the host's routable address even for ``--node-ip-address=127.0.0.1``
and resolves a ``127.0.0.1:PORT`` bootstrap address to it, so nodes report that address;
everything still stays on this machine, and the driver is given ``127.0.0.1:PORT``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from shared_data import write_pubmedqa_items

from fedrag_ray.config import ClientResources
from fedrag_ray.federated.resources import (
    ResourceError,
    cluster_client_slots,
    ray_client_resources,
)

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
_SCRIPT = BIN / "fedrag-ray"  # the console script; `-m` only if it was not installed
FEDRAG = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "fedrag_ray.cli"]
NODE_ARGS = [
    "--num-cpus=1",
    '--resources={"client_slot": 1}',
    "--object-store-memory=150000000",
    "--min-worker-port=0",
    "--max-worker-port=0",
    "--disable-usage-stats",
]
NUM_CLIENTS, ROUNDS = 4, 2

_NODES_SCRIPT = """
import json, sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
nodes = [{k: n[k] for k in ("NodeID", "Alive", "Resources")} for n in ray.nodes()]
print(json.dumps(nodes))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def cluster_nodes(address: str, env: dict[str, str]) -> list[dict[str, Any]]:
    """``ray.nodes()`` as seen by a fresh driver (a subprocess: this pytest process must not
    stay connected, or a later embedded ``ray.init`` in the session would reuse it)."""
    proc = _run([sys.executable, "-c", _NODES_SCRIPT, address], env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alive_ids(nodes: list[dict[str, Any]]) -> set[str]:
    return {n["NodeID"] for n in nodes if n["Alive"]}


def assert_cluster_intact(cluster: dict[str, Any]) -> None:
    """The driver only disconnected: the same two nodes are still alive."""
    assert alive_ids(cluster_nodes(cluster["address"], cluster["env"])) == cluster["node_ids"]


TERM_GRACE_S = 2.0


def _stop_processes_under(root: str) -> None:
    """SIGTERM, then SIGKILL, the processes whose command line names ``root`` (the Ray
    daemons this module started) and their children (actor and worker processes).

    Those that exit on SIGTERM do so within ~1.5 s (loaded 2-core box); GCS, the raylets,
    the monitor and the runtime-env agents were still up 10 s later and got SIGKILL
    anyway, so a longer grace (it was 10 s) only idled the test worker."""
    skip = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid not in skip and root in " ".join(p.info["cmdline"] or []):
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=TERM_GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def ray_cluster(fedrag_cache):
    """Head + one worker node, both real raylets on this host, torn down at module end."""
    # Short root: Ray's Unix socket paths live under it (108-byte limit).
    root = tempfile.mkdtemp(prefix="frc", dir="/tmp" if os.path.isdir("/tmp") else None)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_TMPDIR=root,
        RAY_USAGE_STATS_ENABLED="0",
        # Actor processes inherit the raylet's environment, not the driver's.
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
        worker = _run(
            [
                RAY,
                "start",
                f"--address={address}",
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--temp-dir={root}/worker",
                *NODE_ARGS,
            ],
            env,
            timeout=240,
        )
        assert worker.returncode == 0, (
            f"ray start (worker) failed:\n{worker.stdout}\n{worker.stderr}"
        )

        deadline = time.monotonic() + 120
        while True:
            nodes = [n for n in cluster_nodes(address, env) if n["Alive"]]
            if len(nodes) == 2 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert len(nodes) == 2, f"expected 2 alive Ray nodes, got {nodes}"
        head_ids = [n["NodeID"] for n in nodes if "node:__internal_head__" in n["Resources"]]
        assert len(head_ids) == 1, nodes
        for n in nodes:
            assert n["Resources"]["CPU"] == 1 and n["Resources"]["client_slot"] == 1, n
        yield {
            "address": address,
            "env": env,
            "root": root,
            "node_ids": {n["NodeID"] for n in nodes},
            "head_id": head_ids[0],
        }
    finally:
        _stop_processes_under(root)
        shutil.rmtree(root, ignore_errors=True)


def small_pubmedqa(tmp_path_factory) -> str:
    """40 PubMedQA items (~135 passages) for the cluster runs: with the default config's
    whole PQA-L file (~1,700 passages) a 1-CPU node spent ~55 s embedding before round 1."""
    path = tmp_path_factory.mktemp("cluster_data") / "pubmedqa_40.json"
    return str(write_pubmedqa_items(path, 40))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    raw = {
        "name": "cluster-tiny",
        "data": {"path": small_pubmedqa(tmp_path_factory), "max_train": 16, "max_eval": 4},
        "eval": {"generate": False},
        "generator": {"model": "tiny-random", "max_length": 96},
        "retriever": {"max_length": 64},  # half the embedding work of each index build
        "train": {"method": "ralt", "batch_size": 2, "ralt": {"k": 2}},
        "federation": {
            "num_clients": NUM_CLIENTS,
            "rounds": ROUNDS,
            "local_steps": 1,
            "client_resources": {"num_cpus": 1, "custom": {"client_slot": 1}},
        },
    }
    path = tmp_path_factory.mktemp("cluster_cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def simulate(cluster: dict[str, Any], config: Path, out: Path, *sets: str, timeout: int = 540):
    args = [x for s in sets for x in ("--set", s)]
    cmd = [*FEDRAG, "simulate", str(config), "--address", cluster["address"], "--output", str(out)]
    t0 = time.perf_counter()
    proc = _run([*cmd, *args], cluster["env"], timeout=timeout)
    return proc, time.perf_counter() - t0


@pytest.mark.timeout(600)
def test_simulate_spreads_client_actors_over_both_nodes(ray_cluster, tiny_config, tmp_path):
    out = tmp_path / "run"
    proc, seconds = simulate(ray_cluster, tiny_config, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())

    # one actor per node (each node has exactly one client_slot), both nodes used
    assert res["cluster_client_slots"] == 2
    assert res["num_actors"] == 2
    actor_nodes = res["actor_nodes"]
    assert set(actor_nodes) == ray_cluster["node_ids"], (actor_nodes, ray_cluster["node_ids"])
    assert all(count > 0 for count in actor_nodes.values())
    assert sum(actor_nodes.values()) == NUM_CLIENTS * ROUNDS

    rounds = [h for h in res["history"] if h["round"] > 0]
    assert [h["round"] for h in rounds] == list(range(1, ROUNDS + 1))
    assert all(h["succeeded"] == NUM_CLIENTS and h["failed"] == 0 for h in rounds)
    assert res["failures"] == 0
    assert {c["partition-id"] for h in rounds for c in h["clients"]} == set(range(NUM_CLIENTS))

    # the driver only disconnected: the external cluster is still up, same two nodes
    assert_cluster_intact(ray_cluster)
    print(f"two-node simulate: {seconds:.1f}s wall, timings {res['timings']}, nodes {actor_nodes}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("federation.client_resources.num_gpus=1", ("GPU",)),
        ("federation.client_resources.custom.tpu_slot=1", ("tpu_slot",)),
    ],
    ids=["gpu", "custom-tpu_slot"],
)
def test_impossible_client_resources_fail_fast(ray_cluster, tiny_config, tmp_path, override, names):
    out = tmp_path / "run"
    proc, seconds = simulate(ray_cluster, tiny_config, out, override, timeout=240)
    stderr = " ".join(proc.stderr.split())  # rich wraps lines
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "cannot be satisfied" in stderr, stderr[-2000:]
    for name in names:
        assert name in stderr, stderr[-2000:]
    # checked right after joining Ray: no data, model or index work was done first
    assert not (out / "stores").exists()
    assert not (out / "results.json").exists()
    # Interpreter + torch/transformers/flwr imports and the Ray connection only; the
    # data/model/index preparation (~40 s on a loaded 2-core box) never starts.
    assert seconds < 60, f"resource error took {seconds:.1f}s"
    # a failed driver must not take the external cluster down either
    assert_cluster_intact(ray_cluster)
    print(f"{override}: exit 2 after {seconds:.1f}s")


# --- unit level: cluster_client_slots on synthetic node tables -------------------------

GPU_NODE = {"NodeID": "a" * 56, "Resources": {"CPU": 8.0, "GPU": 1.0, "client_slot": 2.0}}
CPU_NODE = {"NodeID": "b" * 56, "Resources": {"CPU": 4.0, "memory": 1e10}}
NODES = [GPU_NODE, CPU_NODE]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("resources", "slots"),
    [
        (ClientResources(num_cpus=1), 8 + 4),
        (ClientResources(num_cpus=0.5), 16 + 8),
        (ClientResources(num_cpus=3), 2 + 1),
        (ClientResources(num_cpus=1, num_gpus=0.25), 4 + 0),  # GPU-less node contributes 0
        (ClientResources(num_cpus=0.8, num_gpus=0.1), 10 + 0),
        (ClientResources(num_cpus=1, custom={"client_slot": 1}), 2 + 0),
        (ClientResources(num_cpus=4, custom={"client_slot": 1}), 2 + 0),
        (ClientResources(num_cpus=1, num_gpus=0.5, custom={"client_slot": 0.5}), 2 + 0),
    ],
)
def test_cluster_client_slots_per_node_minimum(resources, slots):
    assert cluster_client_slots(resources, NODES) == slots


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        (ClientResources(num_cpus=1, num_gpus=2), ["GPU=2", "largest node has 1", "total 1"]),
        (ClientResources(num_cpus=16), ["CPU=16", "largest node has 8", "total 12"]),
        (ClientResources(custom={"tpu_slot": 1}), ["tpu_slot=1", "largest node has 0"]),
        (ClientResources(custom={"client_slot": 3}), ["client_slot=3", "largest node has 2"]),
    ],
)
def test_cluster_client_slots_impossible_names_the_resource(resources, expected):
    with pytest.raises(ResourceError) as err:
        cluster_client_slots(resources, NODES)
    msg = str(err.value)
    assert "federation.client_resources" in msg
    for part in expected:
        assert part in msg, msg


@pytest.mark.timeout(60)
def test_cluster_client_slots_combination_no_single_node_has():
    """Each resource exists somewhere, but no node has both: the message says so."""
    nodes = [
        {"NodeID": "c" * 56, "Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}},
        {"NodeID": "d" * 56, "Alive": True, "Resources": {"CPU": 8.0}},
    ]
    with pytest.raises(ResourceError, match=r"combination of CPU=2, GPU=1"):
        cluster_client_slots(ClientResources(num_cpus=2, num_gpus=1), nodes)
    assert cluster_client_slots(ClientResources(num_cpus=1, num_gpus=1), nodes) == 1


@pytest.mark.timeout(60)
def test_ray_client_resources_passes_custom_under_resources():
    res = ClientResources(num_cpus=1, num_gpus=0.25, custom={"client_slot": 1})
    assert ray_client_resources(res) == {
        "num_cpus": 1.0,
        "num_gpus": 0.25,
        "resources": {"client_slot": 1.0},
    }
    assert "resources" not in ray_client_resources(ClientResources())
