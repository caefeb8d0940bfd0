"""Run a federated RAG fine-tuning simulation on Flower's Ray backend.

:class:`FederatedSession` is one federation: it connects to Ray, prepares the federation,
then trains the rounds (``run_federated``) or runs a task on it (federated retrieval).

The driver holds data, arrays and Flower's server loop — never a model: the global index
is embedded once by a client actor (``client_tasks.prepare``) and saved; the per-client
private shards are sliced from its embeddings here (NumPy and FAISS only), saved, and
loaded lazily by whichever actor serves the client; server-side evaluation runs on an
actor too. So this process imports neither torch nor transformers (``results.json``
records ``driver_imported_torch``). Ray is started here (embedded, local) or joined
(``address="auto"`` / ``HOST:PORT``); Flower's backend is asked for exactly the actor
pool that fits (see ``ray_backend``) and leaves Ray running for its owner.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrag_ray import compat
from fedrag_ray.atomic import atomic_write_bytes, atomic_write_json, npz_bytes
from fedrag_ray.config import ExperimentConfig, recall_metric_names
from fedrag_ray.data import RagDataset, load_dataset_from_config
from fedrag_ray.federated.client_app import make_client_app
from fedrag_ray.federated.client_runtime import global_store_path, store_dir
from fedrag_ray.federated.knowledge import public_store_path
from fedrag_ray.federated.protocol import PER_QUESTION_KEY
from fedrag_ray.federated.ray_backend import SimulationNodes, fedrag_backend
from fedrag_ray.federated.ray_head import start_or_join_ray
from fedrag_ray.federated.resources import cluster_client_slots, ray_client_resources
from fedrag_ray.federated.sampling import client_partitions
from fedrag_ray.federated.server_app import (
    FederatedServer,
    FederationTask,
    ServerResult,
    make_server_app,
    process_tree_rss,
)
from fedrag_ray.federated.store_access import check_store_roots
from fedrag_ray.knowledge_store import MANIFEST, KnowledgeStore, read_manifest
from fedrag_ray.progress import ProgressFn
from fedrag_ray.provenance import check_provenance, shard_provenance
from fedrag_ray.runtime import configure_process, quiet_env, quiet_warnings, verbose
from fedrag_ray.stats import paired_gains

SHARD_WRITERS = 8  # concurrent shard saves: the fsyncs of KnowledgeStore.save overlap


def reusable(path: Path, want: dict[str, Any]) -> bool:
    """A shard on disk is reused if its manifest records ``want`` (this partition,
    corpus, encoder and index), else the run stops naming what changed."""
    if not (path / MANIFEST).exists():
        return False
    check_provenance(
        path,
        read_manifest(path).get("provenance") or {},
        want,
        f"delete {path.parent} or set federation.shard_dir to a new directory",
    )
    return True


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

    def build(job: tuple[Path, list[int], dict[str, Any]]) -> None:  # one shard's save
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
    """Start or join Ray for a run, with the run's environment on every worker; True
    when this call started it (and must stop it)."""
    return start_or_join_ray(address, num_cpus, env_vars={**quiet_env(), **forwarded_env()})


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

    def train(cfg: ExperimentConfig, output: str | Path | None, **kwargs: Any) -> dict[str, Any]:
        return FederatedSession(cfg, output, **kwargs).train()

    return track_federated(
        train,
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


@dataclass
class Layout:
    """Where a run's clients run and its stores live, settled before any model work."""

    slots: int  # client slots the cluster (or the Tune trial) offers
    num_actors: int
    stores_root: Path
    global_path: Path
    nodes_checked: int  # nodes that proved they read the store root (0: a local head started here)


class FederatedSession:
    """One federation on Ray: connect, check the cluster, load and partition the data,
    have a client actor prepare the models and the global index, build the private
    shards; then either :meth:`train` the rounds or :meth:`retrieve` (run a task such as
    federated retrieval on the prepared federation). Ray is started here (embedded,
    local) and stopped at the end, or joined (``address``) and left running; Flower's
    backend gets exactly the actor pool that fits (``ray_backend``)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        output: str | Path | None = None,
        *,
        address: str | None = None,
        resume: bool = False,
        on_round: Callable[[dict[str, Any]], None] | None = None,
        on_phase: Callable[[str], None] | None = None,
        num_cpus: int | None = None,
        stock_backend: bool = False,
        progress: ProgressFn | None = None,
    ) -> None:
        if cfg.federation is None:
            raise ValueError("config has no federation: section; use `fedrag-ray train`")
        compat.check_versions()  # Flower's and Ray's private hooks: the tested versions
        self.cfg = cfg
        self.fed = cfg.federation
        self.output = output
        self.address = address
        self.resume = resume
        self.on_round = on_round
        self.phase = on_phase or (lambda _m: None)
        self.num_cpus = num_cpus
        self.stock_backend = stock_backend
        self.progress = progress  # each round's clients as their replies arrive
        self.cfg_json = cfg.model_dump_json()
        self.run_id = uuid.uuid4().hex[:12]  # names this run's shard actors (index_service)
        self.served: list[Any] = []  # shard-actor services started for this run
        self.shard_actors: list[dict[str, Any]] = []
        self.shards_built = 0

    def train(self) -> dict[str, Any]:
        """Train the configured rounds; the run's summary (also ``results.json``)."""
        return self._run(None)

    def retrieve(self, task: FederationTask) -> dict[str, Any]:
        """Run ``task`` on the prepared federation instead of training; its results, with
        the shard actors and the store-root check."""
        return self._run(task)

    def _run(self, task: FederationTask | None) -> dict[str, Any]:
        t_start = time.perf_counter()
        run_dir = self._run_dir()
        # Join (or start) Ray and check that the client resources fit *before* the slow
        # data and model preparation, so an impossible request fails in seconds.
        self.phase("connecting to Ray")
        with quiet_warnings(), self._ray() as local_head:
            layout = self._layout(run_dir, local_head)
            self.phase("loading data")
            data = load_dataset_from_config(self.cfg.data)
            t = time.perf_counter()
            partitions = client_partitions(self.cfg, data.train)
            partition_seconds = time.perf_counter() - t
            setup_seconds = time.perf_counter() - t_start
            server = FederatedServer(
                self.cfg,
                self.cfg_json,
                str(run_dir),
                resume=self.resume,
                on_round=self.on_round,
                prepare_knowledge=lambda: self._prepare_knowledge(data, partitions, layout),
                on_phase=self.phase,
                nodes=SimulationNodes(),
                partitions=partitions,
                task=task,
                progress=self.progress,
            )
            t_sim = time.perf_counter()
            result = self._simulate(server, layout)
            if result.task is not None:
                return {
                    **result.task,
                    "shard_actors": self.shard_actors,
                    "store_root_nodes_checked": layout.nodes_checked,
                }
            import ray

            actor_nodes = _client_nodes(result.history) if ray.is_initialized() else {}
            sim_seconds = time.perf_counter() - t_sim
        timings = {
            "setup_s": setup_seconds,
            "simulation_s": sim_seconds,
            "partition_s": partition_seconds,
        }
        return self._finish(run_dir, layout, result, actor_nodes, timings, t_start)

    # ------------------------------------------------------------------ steps

    def _run_dir(self) -> Path:
        """The output directory (a temporary one without ``output``); on resume it must
        hold a complete checkpoint."""
        configure_process(own_process=False)  # warnings: scoped by _run (quiet_warnings)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        # Flower's notices (run_simulation deprecated, no federated evaluation) are not
        # the user's concern: evaluation is server-side by design.
        logging.getLogger("flwr").setLevel(logging.WARNING if verbose() else logging.ERROR)
        run_dir = Path(self.output) if self.output else Path(tempfile.mkdtemp(prefix="fedrag-ray-"))
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume and not (run_dir / "checkpoint" / "meta.json").exists():
            raise FileNotFoundError(f"--resume: {run_dir} holds no complete checkpoint")
        return run_dir

    @contextlib.contextmanager
    def _ray(self) -> Iterator[bool]:
        """Ray for the run: started here (and shut down at the end) or joined; the shard
        actors this run started are stopped on every way out. Yields whether this run
        started a local head of its own (its one node is the driver's)."""
        started_ray = _init_ray(self.address, self.num_cpus)
        try:
            yield started_ray and not self.address  # a Ray head of this run's own
        finally:
            if self.served:
                from fedrag_ray import index_service

                for handle in self.served:
                    index_service.stop(handle)
            if started_ray:
                import ray

                ray.shutdown()

    def _layout(self, run_dir: Path, local_head: bool) -> Layout:
        """Client slots and actors; the store root, checked readable on every client node."""
        fed = self.fed
        slots = cluster_client_slots(fed.client_resources)
        stores_root = Path(fed.shard_dir) if fed.shard_dir else run_dir / "stores"
        stores_root.mkdir(parents=True, exist_ok=True)
        global_path = global_store_path(self.cfg, stores_root)
        global_path.parent.mkdir(parents=True, exist_ok=True)
        if local_head:
            # a head started here is this machine's one node, the driver's: it wrote the
            # stores root, so there is nothing to prove (the probe costs a worker start)
            checked = 0
        else:
            self.phase("checking that every client node reads the store root")
            checked = check_store_roots([stores_root, global_path.parent], fed.client_resources)
        num_actors = fed.num_actors or min(slots, fed.sampled)
        return Layout(slots, num_actors, stores_root, global_path, checked)

    def _prepare_knowledge(
        self, data: RagDataset, partitions: list[list[int]], layout: Layout
    ) -> None:
        """After an actor saved the global index: slice the private shards from it, and
        start the shard actors that serve it (``serve: actors``)."""
        fed = self.fed
        if fed.knowledge != "global":
            self.phase(f"building private shards for {fed.num_clients} clients")
            store = KnowledgeStore.load(layout.global_path)
            self.shards_built += build_client_shards(
                self.cfg, data, store, layout.stores_root, partitions
            )
        if self.cfg.knowledge_store.serve != "actors":
            return
        from fedrag_ray import index_service

        paths = [layout.global_path]
        public = public_store_path(layout.stores_root)
        if fed.knowledge == "both" and (public / MANIFEST).exists():
            paths.append(public)
        for path in paths:
            self.phase(f"starting shard actors for {path}")
            name = index_service.service_name(path, self.run_id)
            handle, infos = index_service.start(path, self.cfg.knowledge_store.serve_cpus, name)
            self.served.append(handle)
            self.shard_actors.extend({**i, "store": path.name} for i in infos)

    def _simulate(self, server: FederatedServer, layout: Layout) -> ServerResult:
        """Flower's simulation engine on Ray, with fedrag_ray's backend; the server's
        result, or its error raised here."""
        from flwr.simulation import run_simulation

        fed = self.fed
        backend_config = {
            "client_resources": ray_client_resources(fed.client_resources),
            "fedrag": {
                "num_actors": layout.num_actors,
                "client_step": fed.client_step,
                "backend": "flower-stock" if self.stock_backend else "fedrag_ray",
                "shutdown_ray": False,
                "env_vars": {**quiet_env(), **forwarded_env()},
            },
        }
        self.phase(f"simulating {fed.num_clients} clients on {layout.num_actors} Ray actors")
        with fedrag_backend(server.nodes, stock=self.stock_backend), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # run_simulation's own
            run_simulation(
                server_app=make_server_app(server),
                client_app=make_client_app(self.cfg_json, str(layout.stores_root), self.run_id),
                num_supernodes=fed.num_clients,
                backend_config=backend_config,
            )
        if server.error is not None:
            raise RuntimeError(f"federated run failed: {server.error}") from server.error
        if server.result is None:
            raise RuntimeError("federated run ended without results (see the log above)")
        return server.result

    def _finish(
        self,
        run_dir: Path,
        layout: Layout,
        result: ServerResult,
        actor_nodes: dict[str, int],
        timings: dict[str, float],
        t_start: float,
    ) -> dict[str, Any]:
        """The run's summary: written to ``results.json`` with the final arrays and plots."""
        summary = run_summary(
            self.cfg,
            layout,
            result,
            backend="flower-stock" if self.stock_backend else "fedrag_ray",
            actor_nodes=actor_nodes,
            shard_actors=self.shard_actors,
            timings={
                **timings,
                "discovery_s": result.timings.get("discovery_seconds", 0.0),
                "prepare_s": result.timings.get("prepare_seconds", 0.0),
                "index_s": result.timings.get("index_seconds", 0.0),
                "shards_s": result.timings.get("shards_seconds", 0.0),
                "first_round_started_at": result.timings.get("first_round_started_at"),
                "total_s": time.perf_counter() - t_start,
                "shards_built": self.shards_built,
            },
        )
        atomic_write_json(run_dir / "results.json", summary)
        atomic_write_bytes(run_dir / "trainable_state.npz", npz_bytes(result.final_arrays))
        _plots(summary, run_dir)
        summary["final_arrays"] = result.final_arrays
        summary["output"] = str(run_dir)
        return summary


def run_summary(
    cfg: ExperimentConfig,
    layout: Layout,
    result: ServerResult,
    backend: str,
    actor_nodes: dict[str, int],
    shard_actors: list[dict[str, Any]],
    timings: dict[str, Any],
) -> dict[str, Any]:
    """What ``results.json`` says about a federated run. Long on purpose: one flat dict
    literal, so the file's fields are read (and changed) in one place."""
    fed = cfg.federation
    assert fed is not None
    history = result.history
    rounds = [h for h in history if h["round"] > 0]
    first, last = history[0], history[-1]
    return {
        "mode": "federated",
        "name": cfg.name,
        "seed": cfg.seed,
        "method": cfg.train.method,
        "num_clients": fed.num_clients,
        "clients_per_round": fed.sampled,
        "num_actors": layout.num_actors,
        "client_step": fed.client_step,
        "backend": backend,
        "cluster_client_slots": layout.slots,
        "strategy": fed.strategy.name,
        "knowledge": fed.knowledge,
        "partition": fed.partition.model_dump(),
        "rounds": fed.rounds,
        "resumed_from_round": result.resumed_from_round,
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
        "full_model_bytes": result.full_model_bytes,
        "trainable_bytes": int(sum(v.nbytes for v in result.final_arrays.values())),
        "failures": int(sum(h["failed"] for h in rounds)),
        "privacy": result.privacy,
        "secure_aggregation": result.secure_aggregation,
        # the simulated clock (federated/clock.py): policy, each client's tier, per-tier
        # tasks and the share of each tier's examples that reached the model
        "sim_time": rounds[-1].get("sim_time", 0.0) if rounds else 0.0,
        "heterogeneity": result.heterogeneity,
        "actor_nodes": actor_nodes,
        "store_root_nodes_checked": layout.nodes_checked,
        "shard_actors": [
            {"shard": i["shard"], "node_id": i["node_id"], "pid": i["pid"]} for i in shard_actors
        ],
        "timings": timings,
        "driver_imported_torch": "torch" in sys.modules,
        "peak_rss_bytes": max([h.get("peak_rss_bytes", 0) for h in rounds] + [process_tree_rss()]),
        "config": json.loads(cfg.model_dump_json()),
    }


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
    from fedrag_ray.plots import metric_vs_sim_time, metrics_vs_round, run_story

    hist = summary["history"]
    recalls = recall_metric_names(summary["config"]["eval"]["k_values"])
    keys = [k for k in (*recalls, "mrr", "accuracy", "exact_match", "f1") if k in hist[-1]]
    metrics_vs_round(hist, keys, run_dir / "metrics_vs_round.png", "server-side evaluation")
    name = str(summary.get("config", {}).get("name", "run"))
    run_story(hist, run_dir / "story.png", title=name)
    if summary.get("sim_time"):  # a run on the simulated clock (client profiles)
        metric_vs_sim_time({name: hist}, run_dir / "metric_vs_sim_time.png", title=name)
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
