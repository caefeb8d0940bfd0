"""The Flower ServerApp: fedrag_ray's round loop around a Flower strategy.

Before round 1: discover partition → node, ask one client actor to *prepare* (build the
global index if missing, return the initial trainable arrays), let the caller build the
private shards from that index, evaluate the initial arrays. Each round: sample clients
(seeded by the round, so a resumed run samples the same ones) → ``strategy.configure_train``
→ ``grid.send_and_receive`` (or Flower's SecAgg+, ``secagg.py``) → drop failed replies and
those that fail validation (``validation.py``, reasons kept) → ``strategy.aggregate_train``
(in Flower's DP wrapper when configured, ``privacy.py``; the privacy ledger records ε) on
the successful ones in partition order (float sums in a fixed order make resumed and
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
from fedrag_ray.federated.privacy import (
    UNIFORM_WEIGHT_KEY,
    PrivacyLedger,
    clipping_norm_of,
    composes_itself,
    noise_std_of,
    seed_noise,
    wrap_strategy,
)
from fedrag_ray.federated.privacy import aggregate_train as dp_aggregate_train
from fedrag_ray.federated.secagg import max_weight, secure_round
from fedrag_ray.federated.strategies import (
    SampledGrid,
    build_strategy,
    load_strategy_state,
    strategy_state,
)
from fedrag_ray.federated.validation import (
    ARRAYS_KEY,
    METRICS_KEY,
    PARTITION_KEY,
    WEIGHT_KEY,
    InvalidUpdate,
    check_arrays,
    split_valid,
)

RoundCallback = Callable[[dict[str, Any]], None]
# Instead of training: work on the prepared federation (federated retrieval at inference,
# ``federated_retrieval``), given the grid, this server and the initial arrays.
InferenceFn = Callable[[Grid, "FederatedServer", dict[str, np.ndarray]], None]

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
        inference: InferenceFn | None = None,
    ) -> None:
        assert cfg.federation is not None
        self.inference = inference
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

    def build_strategy(self, privacy_state: dict[str, Any]) -> tuple[Any, PrivacyLedger | None]:
        """Flower's strategy, in Flower's DP wrapper when configured, and the privacy
        ledger (restored from ``privacy_state`` on resume: same noise, same events)."""
        pcfg = self.fed.privacy
        ledger = None
        if pcfg.mode != "none":
            ledger = PrivacyLedger(self.fed, privacy_state.get("noise_multiplier"))
            if privacy_state:
                ledger.load(privacy_state)
        uniform = pcfg.mode == "central"
        base = build_strategy(self.fed.strategy, UNIFORM_WEIGHT_KEY if uniform else WEIGHT_KEY)
        strategy = wrap_strategy(base, self.fed, ledger)
        if privacy_state.get("clipping_norm") is not None and pcfg.adaptive:
            strategy.clipping_norm = float(privacy_state["clipping_norm"])
        return strategy, ledger

    def run(self, grid: Grid) -> None:
        if hasattr(grid, "pull_interval"):  # InMemoryGrid (simulation)
            grid.pull_interval = PULL_INTERVAL_S
        ckpt = load_checkpoint(self.run_dir, self.fingerprint) if self.resume else None
        strategy, ledger = self.build_strategy(ckpt.extra.get("privacy", {}) if ckpt else {})
        pcfg = self.fed.privacy
        secagg = pcfg.secagg.enabled
        uniform = pcfg.mode == "central"
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
        if self.inference is not None:
            self.part_to_node = part_to_node
            self.inference(grid, self, arrays)
            return

        if ckpt is not None:
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
            if ledger is not None:
                seed_noise(pcfg, server_round)
            config = ConfigRecord({"server-round": server_round})
            messages = list(
                strategy.configure_train(
                    server_round,
                    to_record(arrays),
                    config,
                    SampledGrid(grid, [part_to_node[p] for p in sampled]),
                )
            )
            norms: dict[Any, float] = {}
            extra: dict[str, Any] = {}
            if secagg:  # the server only ever holds the sum (see secagg.py)
                sr = secure_round(
                    grid,
                    messages,
                    arrays,
                    pcfg.secagg,
                    server_round,
                    self.fed.round_timeout_s,
                    uniform,
                    max_weight(pcfg.secagg, self.fed, self.cfg.train.batch_size),
                )
                ok, failed = sr.replies, sr.failures
                bytes_down, bytes_up = sr.bytes_sent, sr.bytes_received
                extra["secagg_seconds"] = sr.seconds
            else:
                bytes_down = sum(record_nbytes(m.content[ARRAYS_KEY]) for m in messages)
                replies = list(grid.send_and_receive(messages, timeout=self.fed.round_timeout_s))
                ok = [r for r in replies if not r.has_error()]
                failed = [r.error.reason for r in replies if r.has_error()]
                failed += ["timeout"] * (len(messages) - len(replies))
                bytes_up = sum(record_nbytes(r.content[ARRAYS_KEY]) for r in ok)
                ok, rejected, norms = split_valid(ok, arrays, self.fed.validation.max_update_norm)
                failed += rejected
                extra["rejected"] = len(rejected)
            ok.sort(key=lambda r: int(r.content[METRICS_KEY][PARTITION_KEY]))
            clients = [
                {k: v for k, v in r.content[METRICS_KEY].items() if k != WEIGHT_KEY}
                | {"num_examples": r.content[METRICS_KEY][WEIGHT_KEY]}
                | ({"update-norm": norms[pid]} if (pid := _pid(r)) in norms else {})
                for r in ok
            ]
            if uniform:
                for r in ok:
                    r.content[METRICS_KEY][UNIFORM_WEIGHT_KEY] = 1
            if ledger is not None and uniform:
                extra["dp_clipping_norm"] = clipping_norm_of(strategy)
                extra["dp_noise_std"] = noise_std_of(strategy)
            aggregated = len(ok) >= min_ok
            if aggregated:
                new_arrays, _ = dp_aggregate_train(strategy, server_round, ok)
                aggregated = new_arrays is not None
                if new_arrays is None:
                    extra["not_aggregated"] = (
                        f"Flower's DP wrapper releases only when all {len(messages)} sampled "
                        f"clients reply ({len(ok)} did): nothing released, no ε spent"
                        if composes_itself(strategy) and len(ok) != len(messages)
                        else "the strategy returned no aggregate"
                    )
                else:
                    candidate = from_record(new_arrays)
                    try:  # last guard: never let a corrupt aggregate into the model
                        check_arrays(candidate, arrays)
                        arrays = candidate
                    except InvalidUpdate as err:
                        aggregated = False
                        extra["not_aggregated"] = f"aggregate rejected: {err}"
                    if ledger is not None and pcfg.mode == "central":
                        if not composes_itself(strategy):
                            ledger.compose_round(len(ok))
            else:
                extra["not_aggregated"] = f"{len(ok)} successful clients < min_successes {min_ok}"
            if ledger is not None and pcfg.mode == "local" and ok:
                ledger.compose_round(1)  # each reply was itself a (local-DP) release
            if ledger is not None:
                extra |= ledger.row()
            train_seconds = time.perf_counter() - t0
            row: dict[str, Any] = {
                "round": server_round,
                "sampled": len(messages),
                "succeeded": len(ok),
                "failed": len(failed),
                "failure_reasons": failed[:8],
                "aggregated": aggregated,
                **extra,
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
                    extra=self._privacy_extra(strategy, ledger),
                ),
            )
            self.on_round(row)

        self.results["history"] = history
        self.results["final_arrays"] = arrays
        if ledger is not None:
            self.results["privacy"] = ledger.summary(self.fed)
        if secagg:
            self.results["secure_aggregation"] = {
                "protocol": "SecAgg+ (Flower SecAggPlusWorkflow + secaggplus_mod)",
                **pcfg.secagg.model_dump(),
                "max_weight": max_weight(pcfg.secagg, self.fed, self.cfg.train.batch_size),
            }

    def _privacy_extra(self, strategy: Any, ledger: PrivacyLedger | None) -> dict[str, Any]:
        if ledger is None:
            return {}
        return {"privacy": {**ledger.state(), "clipping_norm": clipping_norm_of(strategy)}}


def _pid(reply: Message) -> int:
    return int(reply.content[METRICS_KEY][PARTITION_KEY])


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
