"""Run a federated RAG fine-tuning simulation on Flower's Ray backend.

The driver holds data, arrays and Flower's server loop — never a model: the global index
is embedded once by a client actor (``client_app.server_task``) and saved; the per-client
private shards are sliced from its embeddings here (NumPy and FAISS only), saved, and
loaded lazily by whichever actor serves the client; server-side evaluation runs on an
actor too. So this process imports neither torch nor transformers (``results.json``
records ``driver_imported_torch``). Ray is started here (embedded, local) or joined
(``address="auto"`` / ``HOST:PORT``); Flower's backend is asked for exactly the actor
pool that fits (see ``ray_backend``) and leaves Ray running for its owner.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fedrag_ray.atomic import atomic_write_bytes, atomic_write_json, npz_bytes
from fedrag_ray.config import ExperimentConfig
from fedrag_ray.data import RagDataset, load_dataset_from_config
from fedrag_ray.federated.client_app import global_store_path, make_client_app, store_dir
from fedrag_ray.federated.knowledge import public_store_path
from fedrag_ray.federated.protocol import PER_QUESTION_KEY
from fedrag_ray.federated.ray_backend import SimulationNodes, fedrag_backend
from fedrag_ray.federated.ray_head import lean_local_head, workers_at_driver_niceness
from fedrag_ray.federated.resources import cluster_client_slots, ray_client_resources
from fedrag_ray.federated.sampling import client_partitions
from fedrag_ray.federated.server_app import (
    FederatedServer,
    InferenceFn,
    make_server_app,
    process_tree_rss,
)
from fedrag_ray.federated.store_access import check_store_roots
from fedrag_ray.knowledge_store import MANIFEST, KnowledgeStore, read_manifest
from fedrag_ray.progress import ProgressFn
from fedrag_ray.provenance import check_provenance, shard_provenance
from fedrag_ray.runtime import configure_process, quiet_env, verbose
from fedrag_ray.stats import paired_gains

SHARD_WRITERS = 8  # concurrent shard saves: the fsyncs of KnowledgeStore.save overlap


def build_client_shards(
    cfg: ExperimentConfig,
    data: RagDataset,
    store: KnowledgeStore,
    root: Path,
    parts: list[list[int]] | None = None,
) -> int:
    """Private knowledge per client: the passages of the documents its own questions come
    from; with ``knowledge: both`` also one public store of the passages no client owns,
    which every client searches next to its shard (not copied into each). Vectors are
    sliced from the global store, never re-embedded. A shard already on disk is reused
    only if its manifest records this partition, corpus, encoder and index (else the
    run stops naming what changed: ``provenance``).

    Shards are saved from a small thread pool: each save fsyncs its files, and one at a
    time that is ~20 ms per client (1,000 clients: 22 s; 8 writers: 1.6 s)."""
    fed = cfg.federation
    assert fed is not None
    if parts is None:
        parts = client_partitions(cfg, data.train)
    by_doc: dict[str, list[int]] = {}
    for i, p in enumerate(store.passages):
        by_doc.setdefault(p.doc_id, []).append(i)
    owned = {d for e in data.train for d in e.gold_doc_ids}
    public = [i for d, idx in by_doc.items() if d not in owned for i in idx]
    ks = cfg.knowledge_store.model_copy(update={"device": "cpu"})
    expected = shard_provenance(cfg, store.provenance)
    jobs: list[tuple[Path, list[int], dict[str, Any]]] = []

    def reusable(path: Path, want: dict[str, Any]) -> bool:
        if not (path / MANIFEST).exists():
            return False
        check_provenance(
            path,
            read_manifest(path).get("provenance") or {},
            want,
            f"delete {path.parent} or set federation.shard_dir to a new directory",
        )
        return True

    if fed.knowledge == "both":
        want = shard_provenance(cfg, store.provenance, role="public")
        if public and not reusable(public_store_path(root), want):
            jobs.append((public_store_path(root), public, want))
    for c, part in enumerate(parts):
        path = store_dir(root, c)
        if reusable(path, expected):
            continue
        docs = {d for i in part for d in data.train[i].gold_doc_ids}
        idx = [i for d in sorted(docs) for i in by_doc.get(d, [])]
        if not idx and fed.knowledge == "private":
            raise ValueError(f"client {c} owns no passages; use federation.knowledge: global")
        if idx:  # knowledge both: a client without own passages searches the public store
            jobs.append((path, idx, expected))

    def build(job: tuple[Path, list[int], dict[str, Any]]) -> None:
        path, idx, provenance = job
        n_shards = ks.n_shards if provenance["role"] == "public" else 1
        shard = KnowledgeStore.from_config(store.dim, ks.model_copy(update={"n_shards": n_shards}))
        shard.add([store.passages[i] for i in idx], store.vectors(np.asarray(idx)))
        shard.provenance = provenance
        shard.save(path)

    with ThreadPoolExecutor(max_workers=SHARD_WRITERS) as pool:
        list(pool.map(build, jobs))
    return len(jobs)


FORWARDED_ENV_PREFIXES = ("FEDRAG_RAY_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "FLWR_")


def forwarded_env() -> dict[str, str]:
    """Settings the client actors must share with the driver (offline mode, cache dir,
    fault injection). Passed as the job's runtime env, so they also reach the workers of
    a cluster joined with --address, whose raylets never saw this shell's environment."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Start or join Ray; returns True when this call started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": True,
        "runtime_env": {"env_vars": {**quiet_env(), **forwarded_env()}},
    }
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
        # Ray prestarts one idle Python worker per CPU for the first driver; the client
        # actors never reuse them (they start with the job's runtime env), so they only
        # sat there holding ~85 MiB each.
        kwargs["_system_config"] = {"prestart_worker_first_driver": False}
        workers_at_driver_niceness()
    with warnings.catch_warnings():
        # Ray's notice that it may stop hiding GPUs from num_gpus=0 actors; it still does,
        # which is what keeps CPU-only actors off a GPU.
        warnings.filterwarnings("ignore", message=".*accelerator visible devices.*")
        if address:
            ray.init(**kwargs)
        else:
            with lean_local_head():  # no autoscaler monitor, no dashboard API server
                ray.init(**kwargs)
    return True


def _client_nodes(history: list[dict[str, Any]]) -> dict[str, int]:
    """Ray node id → number of client trainings that ran on it (from the clients' tags)."""
    import ray

    names = {int(n["NodeID"][:8], 16): n["NodeID"] for n in ray.nodes()}
    counts: dict[str, int] = {}
    for h in history:
        for c in h.get("clients", []):
            node = names.get(int(c.get("actor-node", -1)), "unknown")
            counts[node] = counts.get(node, 0) + 1
    return counts


def run_federated(
    cfg: ExperimentConfig,
    output: str | Path | None = None,
    address: str | None = None,
    resume: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    num_cpus: int | None = None,
    stock_backend: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """The federated run; a ``tracking:`` section also logs it (fedrag_ray.tracking).
    ``progress(stage, done, total)``: each round's clients as their replies arrive.

    ``stock_backend``: Flower 1.41's own RayBackend and message poller instead of
    fedrag_ray's (``ray_backend``), as the baseline of benchmarks/simulation_scale.py; its
    pool is sized from the whole cluster and it shuts Ray down at the end."""
    from fedrag_ray.tracking import track_federated

    return track_federated(
        _run_federated,
        cfg,
        output,
        on_round,
        address=address,
        resume=resume,
        on_phase=on_phase,
        num_cpus=num_cpus,
        stock_backend=stock_backend,
        progress=progress,
    )


def _run_federated(
    cfg: ExperimentConfig,
    output: str | Path | None = None,
    address: str | None = None,
    resume: bool = False,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    num_cpus: int | None = None,
    stock_backend: bool = False,
    inference: InferenceFn | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    fed = cfg.federation
    if fed is None:
        raise ValueError("config has no federation: section; use `fedrag-ray train`")
    phase = on_phase or (lambda _m: None)
    configure_process()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Flower's notices (run_simulation deprecated, no federated evaluation) are not the
    # user's concern: evaluation is server-side by design.
    logging.getLogger("flwr").setLevel(logging.WARNING if verbose() else logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    t_start = time.perf_counter()
    run_dir = Path(output) if output else Path(tempfile.mkdtemp(prefix="fedrag-ray-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and not (run_dir / "checkpoint" / "meta.json").exists():
        raise FileNotFoundError(f"--resume: {run_dir} holds no complete checkpoint")
    cfg_json = cfg.model_dump_json()

    # Join (or start) Ray and check that the client resources fit *before* the slow data
    # and model preparation, so an impossible request fails in seconds, not minutes.
    phase("connecting to Ray")
    started_ray = _init_ray(address, num_cpus)
    served: list[Any] = []  # shard-actor services started for this run (serve: actors)
    try:
        slots = cluster_client_slots(fed.client_resources)
        num_actors = fed.num_actors or min(slots, fed.sampled)

        stores_root = Path(fed.shard_dir) if fed.shard_dir else run_dir / "stores"
        stores_root.mkdir(parents=True, exist_ok=True)
        global_path = global_store_path(cfg, stores_root)
        global_path.parent.mkdir(parents=True, exist_ok=True)
        phase("checking that every client node reads the store root")
        nodes_checked = check_store_roots([stores_root, global_path.parent], fed.client_resources)

        phase("loading data")
        data = load_dataset_from_config(cfg.data)
        shards_built: list[int] = []
        shard_actors: list[dict[str, Any]] = []
        t = time.perf_counter()
        partitions = client_partitions(cfg, data.train)
        partition_seconds = time.perf_counter() - t

        def prepare_knowledge() -> None:
            """After an actor saved the global index: slice the private shards from it,
            and start the shard actors that serve it (``serve: actors``)."""
            if fed.knowledge != "global":
                phase(f"building private shards for {fed.num_clients} clients")
                store = KnowledgeStore.load(global_path)
                shards_built.append(build_client_shards(cfg, data, store, stores_root, partitions))
            if cfg.knowledge_store.serve == "actors":
                from fedrag_ray import index_service

                served_paths = [global_path]
                if fed.knowledge == "both" and (public_store_path(stores_root) / MANIFEST).exists():
                    served_paths.append(public_store_path(stores_root))
                for path in served_paths:
                    phase(f"starting shard actors for {path}")
                    handle, infos = index_service.start(path, cfg.knowledge_store.serve_cpus)
                    served.append(handle)
                    shard_actors.extend({**i, "store": path.name} for i in infos)

        setup_seconds = time.perf_counter() - t_start
        results: dict[str, Any] = {}
        nodes = SimulationNodes()
        server = FederatedServer(
            cfg,
            cfg_json,
            str(run_dir),
            results,
            resume=resume,
            on_round=on_round,
            prepare_knowledge=prepare_knowledge,
            on_phase=phase,
            nodes=nodes,
            partitions=partitions,
            inference=inference,
            progress=progress,
        )
        backend_config = {
            "client_resources": ray_client_resources(fed.client_resources),
            "fedrag": {
                "num_actors": num_actors,
                "client_step": fed.client_step,
                "backend": "flower-stock" if stock_backend else "fedrag_ray",
                "shutdown_ray": False,
                "env_vars": {**quiet_env(), **forwarded_env()},
            },
        }
        phase(f"simulating {fed.num_clients} clients on {num_actors} Ray actors")
        import ray
        from flwr.simulation import run_simulation

        t_sim = time.perf_counter()
        with fedrag_backend(nodes, stock=stock_backend):
            run_simulation(
                server_app=make_server_app(server),
                client_app=make_client_app(cfg_json, str(stores_root)),
                num_supernodes=fed.num_clients,
                backend_config=backend_config,
            )
        if "error" in results:
            raise RuntimeError(f"federated run failed: {results['error']}") from results["error"]
        if inference is not None:
            results["shard_actors"] = shard_actors
            results["store_root_nodes_checked"] = nodes_checked
            return results
        if "history" not in results:
            raise RuntimeError("federated run ended without results (see the log above)")
        actor_nodes = _client_nodes(results["history"]) if ray.is_initialized() else {}
        sim_seconds = time.perf_counter() - t_sim
    finally:
        if served:
            from fedrag_ray import index_service

            for handle in served:
                index_service.stop(handle)
        if started_ray:
            import ray

            ray.shutdown()

    history = results["history"]
    rounds = [h for h in history if h["round"] > 0]
    first, last = history[0], history[-1]
    summary = {
        "mode": "federated",
        "name": cfg.name,
        "seed": cfg.seed,
        "method": cfg.train.method,
        "num_clients": fed.num_clients,
        "clients_per_round": fed.sampled,
        "num_actors": num_actors,
        "client_step": fed.client_step,
        "backend": "flower-stock" if stock_backend else "fedrag_ray",
        "cluster_client_slots": slots,
        "strategy": fed.strategy.name,
        "knowledge": fed.knowledge,
        "partition": fed.partition.model_dump(),
        "rounds": fed.rounds,
        "resumed_from_round": results.get("resumed_from_round", 0),
        "history": history,
        "metrics_before": _quality(first),
        "metrics_after": _quality(last),
        # last minus first evaluation on the same questions, paired bootstrap interval
        "gain": paired_gains(
            last.get(PER_QUESTION_KEY, {}),
            first.get(PER_QUESTION_KEY, {}),
            cfg.eval.bootstrap_samples,
            cfg.eval.confidence,
            cfg.eval.bootstrap_seed,
        )
        if len(history) > 1
        else {},
        "bytes_per_round": float(np.mean([h["bytes_sent"] + h["bytes_received"] for h in rounds]))
        if rounds
        else 0.0,
        "full_model_bytes": results["full_model_bytes"],
        "trainable_bytes": int(sum(v.nbytes for v in results["final_arrays"].values())),
        "failures": int(sum(h["failed"] for h in rounds)),
        "privacy": results.get("privacy"),
        "secure_aggregation": results.get("secure_aggregation"),
        "actor_nodes": actor_nodes,
        "store_root_nodes_checked": nodes_checked,
        "shard_actors": [
            {"shard": i["shard"], "node_id": i["node_id"], "pid": i["pid"]} for i in shard_actors
        ],
        "timings": {
            "setup_s": setup_seconds,
            "simulation_s": sim_seconds,
            "partition_s": partition_seconds,
            "discovery_s": results.get("discovery_seconds", 0.0),
            "prepare_s": results.get("prepare_seconds", 0.0),
            "index_s": results.get("index_seconds", 0.0),
            "shards_s": results.get("shards_seconds", 0.0),
            "first_round_started_at": results.get("first_round_started_at"),
            "total_s": time.perf_counter() - t_start,
            "shards_built": sum(shards_built),
        },
        "driver_imported_torch": "torch" in sys.modules,
        "peak_rss_bytes": max([h.get("peak_rss_bytes", 0) for h in rounds] + [process_tree_rss()]),
        "config": json.loads(cfg_json),
    }
    atomic_write_json(run_dir / "results.json", summary)
    atomic_write_bytes(run_dir / "trainable_state.npz", npz_bytes(results["final_arrays"]))
    _plots(summary, run_dir)
    summary["final_arrays"] = results["final_arrays"]
    summary["output"] = str(run_dir)
    return summary


def _quality(row: dict[str, Any]) -> dict[str, float]:
    """The evaluation metrics of a history row (not its timings)."""
    return {
        k: v
        for k, v in row.items()
        if isinstance(v, float)
        and not k.endswith("seconds")
        and k not in ("train_loss", "client_compute_seconds")
    }


def _plots(summary: dict[str, Any], run_dir: Path) -> None:
    from fedrag_ray.plots import metrics_vs_round, run_story

    hist = summary["history"]
    keys = [k for k in ("recall@5", "mrr", "accuracy", "exact_match", "f1") if k in hist[0]]
    metrics_vs_round(hist, keys, run_dir / "metrics_vs_round.png", "server-side evaluation")
    run_story(hist, run_dir / "story.png", title=str(summary.get("config", {}).get("name", "run")))
    rounds = [
        {
            **h,
            "peak_rss_gib": h.get("peak_rss_bytes", 0) / 2**30,
            "mib_per_round": (h["bytes_sent"] + h["bytes_received"]) / 2**20,
        }
        for h in hist
        if h["round"] > 0
    ]
    metrics_vs_round(
        rounds,
        ["train_loss", "seconds", "mib_per_round", "peak_rss_gib", "epsilon"],
        run_dir / "rounds.png",
        "per-round figures",
    )
