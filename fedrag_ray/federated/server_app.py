"""The Flower ServerApp: fedrag_ray's round loop around a Flower strategy.

Before round 1: discover partition → node, ask one client actor to *prepare* (build the
global index if missing, return the initial trainable arrays), let the caller build the
private shards from that index, evaluate the initial arrays. Each round: sample clients
(seeded by the round, so a resumed run samples the same ones) → ``strategy.configure_train``
→ ``grid.send_and_receive`` → drop failed replies → ``strategy.aggregate_train`` on the
successful ones in partition order (float sums in a fixed order make resumed and
uninterrupted runs bit-identical) → server-side evaluation every N rounds → atomic
checkpoint. The results are written into a dict owned by the caller, because Flower's
``run_simulation`` returns nothing.

The server holds arrays, never a model: preparation and server-side evaluation are
``evaluate`` messages that a client actor executes with the models it has cached anyway
(``client_app.server_task``), so the driver process imports neither torch nor
transformers. Such a message goes to the first partition's node and, if that fails, to
the next ones.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedrag_ray.config import ExperimentConfig
from fedrag_ray.federated.checkpoint import (
    RoundCheckpoint,
    config_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from fedrag_ray.federated.params import from_record, record_nbytes, to_record
from fedrag_ray.federated.strategies import (
    SampledGrid,
    build_strategy,
    load_strategy_state,
    strategy_state,
)

RoundCallback = Callable[[dict[str, Any]], None]

# Flower's in-memory Grid sleeps 0.1 s between pulls for replies, which rounds every
# round's wall time up to the next 0.1 s; pulling is cheap (only this round's messages).
PULL_INTERVAL_S = 0.01
DISCOVERY_BATCH = 100  # query messages in flight at once during partition discovery
SERVER_TASK_TRIES = 3  # nodes a prepare/evaluate message is tried on before giving up


def process_tree_rss() -> int:
    """Resident memory of this process and all its descendants (Ray's GCS, raylet and
    workers when Ray was started here) in bytes."""
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class FederatedServer:
    def __init__(
        self,
        cfg: ExperimentConfig,
        cfg_json: str,
        run_dir: str,
        results: dict[str, Any],
        resume: bool = False,
        on_round: RoundCallback | None = None,
        prepare_knowledge: Callable[[], None] | None = None,
        on_phase: Callable[[str], None] | None = None,
    ) -> None:
        assert cfg.federation is not None
        self.cfg = cfg
        self.fed = cfg.federation
        self.run_dir = run_dir
        self.results = results
        self.resume = resume
        self.on_round = on_round or (lambda _row: None)
        self.prepare_knowledge = prepare_knowledge or (lambda: None)
        self.phase = on_phase or (lambda _msg: None)
        self.fingerprint = config_fingerprint(cfg_json)
        self.task_nodes: list[int] = []

    def discover(self, grid: Grid) -> dict[int, int]:
        """partition-id → node-id. Flower's node ids are random per run, partition ids are
        not: asking each node once lets every run sample the same partitions."""
        node_ids = list(grid.get_node_ids())
        while len(node_ids) < self.fed.num_clients:
            time.sleep(0.1)
            node_ids = list(grid.get_node_ids())
        mapping = {}
        # In batches: Flower's in-memory LinkState finds a node's message by scanning all
        # stored ones, so one batch of N queries costs O(N^2) (1,000 nodes: ~3 s more).
        for i in range(0, len(node_ids), DISCOVERY_BATCH):
            msgs = [
                Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                for n in node_ids[i : i + DISCOVERY_BATCH]
            ]
            for reply in grid.send_and_receive(msgs, timeout=self.fed.round_timeout_s):
                if not reply.has_error():
                    pid = int(reply.content["metrics"]["partition-id"])
                    mapping[pid] = reply.metadata.src_node_id
        return mapping

    def sample(self, server_round: int) -> list[int]:
        rng = np.random.default_rng([self.cfg.seed, server_round])
        chosen = rng.choice(self.fed.num_clients, size=self.fed.sampled, replace=False)
        return sorted(int(c) for c in chosen)

    def server_task(
        self, grid: Grid, task: str, arrays: dict[str, np.ndarray] | None = None
    ) -> Message:
        """Run ``task`` (prepare / evaluate) on a client actor; the reply message."""
        errors = []
        record = to_record(arrays) if arrays is not None else None
        for node in self.task_nodes[:SERVER_TASK_TRIES]:
            content = RecordDict({"config": ConfigRecord({"task": task})})
            if record is not None:
                content["arrays"] = record
            msg = Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)
            for reply in grid.send_and_receive([msg], timeout=self.fed.round_timeout_s):
                if not reply.has_error():
                    return reply
                errors.append(reply.error.reason)
        raise RuntimeError(f"server task {task!r} failed on every node tried: {errors[:3]}")

    def evaluate(self, grid: Grid, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        reply = self.server_task(grid, "evaluate", arrays)
        return {k: float(v) for k, v in reply.content["metrics"].items()}

    def run(self, grid: Grid) -> None:
        if hasattr(grid, "pull_interval"):  # InMemoryGrid (simulation)
            grid.pull_interval = PULL_INTERVAL_S
        strategy = build_strategy(self.fed.strategy)
        history: list[dict[str, Any]] = []
        start_round = 1

        t = time.perf_counter()
        part_to_node = self.discover(grid)
        self.results["discovery_seconds"] = time.perf_counter() - t
        self.task_nodes = [part_to_node[p] for p in sorted(part_to_node)]

        self.phase("preparing models and the global index on a client actor")
        t = time.perf_counter()
        prepared = self.server_task(grid, "prepare")
        info = prepared.content["metrics"]
        self.results["full_model_bytes"] = int(info["full-model-bytes"])
        self.results["index_seconds"] = float(info["index-seconds"])
        self.results["prepare_seconds"] = time.perf_counter() - t
        arrays = from_record(prepared.content["arrays"])
        t = time.perf_counter()
        self.prepare_knowledge()
        self.results["shards_seconds"] = time.perf_counter() - t

        if self.resume:
            ckpt = load_checkpoint(self.run_dir, self.fingerprint)
            arrays, history, start_round = ckpt.arrays, ckpt.history, ckpt.round + 1
            load_strategy_state(strategy, ckpt.strategy_state)
        else:
            self.phase("evaluating the initial model")
            t = time.perf_counter()
            history.append(
                {"round": 0, **self.evaluate(grid, arrays), "seconds": time.perf_counter() - t}
            )
            self.on_round(history[-1])
        self.results["resumed_from_round"] = start_round - 1
        self.results["first_round_started_at"] = time.time()
        min_ok = self.fed.min_successes or 1

        for server_round in range(start_round, self.fed.rounds + 1):
            t0 = time.perf_counter()
            sampled = [p for p in self.sample(server_round) if p in part_to_node]
            random.seed(f"{self.cfg.seed}-{server_round}")  # Flower shuffles the sample
            config = ConfigRecord({"server-round": server_round})
            messages = list(
                strategy.configure_train(
                    server_round,
                    to_record(arrays),
                    config,
                    SampledGrid(grid, [part_to_node[p] for p in sampled]),
                )
            )
            bytes_down = sum(record_nbytes(m.content["arrays"]) for m in messages)
            replies = list(grid.send_and_receive(messages, timeout=self.fed.round_timeout_s))
            ok = [r for r in replies if not r.has_error()]
            failed = [r.error.reason for r in replies if r.has_error()]
            failed += ["timeout"] * (len(messages) - len(replies))
            ok.sort(key=lambda r: int(r.content["metrics"]["partition-id"]))
            bytes_up = sum(record_nbytes(r.content["arrays"]) for r in ok)
            clients = [
                {k: v for k, v in r.content["metrics"].items() if k != "num-examples"}
                | {"num_examples": r.content["metrics"]["num-examples"]}
                for r in ok
            ]
            aggregated = len(ok) >= min_ok
            if aggregated:
                new_arrays, _ = strategy.aggregate_train(server_round, ok)
                if new_arrays is not None:
                    arrays = from_record(new_arrays)
            train_seconds = time.perf_counter() - t0
            row: dict[str, Any] = {
                "round": server_round,
                "sampled": len(messages),
                "succeeded": len(ok),
                "failed": len(failed),
                "failure_reasons": failed[:5],
                "aggregated": aggregated,
                "bytes_sent": bytes_down,
                "bytes_received": bytes_up,
                "train_loss": float(np.mean([c["train-loss"] for c in clients]))
                if clients
                else None,
                "client_compute_seconds": float(sum(c["train-seconds"] for c in clients)),
                "round_seconds": train_seconds,
                "clients": clients,
            }
            if server_round % self.fed.eval_every == 0 or server_round == self.fed.rounds:
                t = time.perf_counter()
                row.update(self.evaluate(grid, arrays))
                row["eval_seconds"] = time.perf_counter() - t
            row["peak_rss_bytes"] = process_tree_rss()
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            save_checkpoint(
                self.run_dir,
                RoundCheckpoint(
                    round=server_round,
                    arrays=arrays,
                    strategy_state=strategy_state(strategy),
                    history=history,
                    config_hash=self.fingerprint,
                    python_random_state=random.getstate(),
                ),
            )
            self.on_round(row)

        self.results["history"] = history
        self.results["final_arrays"] = arrays


def make_server_app(server: FederatedServer) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            server.run(grid)
        except BaseException as err:  # run_simulation swallows ServerApp errors: keep it
            server.results["error"] = err
            raise

    return app
