"""The Flower ServerApp: fedrag_ray's round loop around a Flower strategy.

Before round 1: take the partition → node mapping the simulation engine registered
(``ray_backend.SimulationNodes``), ask one client actor to *prepare* (build the global
index if missing, return the initial trainable arrays), let the caller build the private
shards from that index, evaluate the initial arrays. Each round: the round's clients and
their train messages (``sampling.ClientSampler``: seeded by the round, so a resumed run
trains the same ones) → ``grid.send_and_receive`` (or Flower's SecAgg+, ``secagg.py``) →
drop failed replies and those that fail validation (``validation.py``, reasons kept) →
``strategy.aggregate_train`` (in Flower's DP wrapper when configured, ``privacy.py``; the
privacy ledger records ε) on the successful ones in partition order (float sums in a
fixed order make resumed and uninterrupted runs bit-identical) → server-side evaluation
every N rounds → the round's rows appended to the run log, then an atomic checkpoint
(``checkpoint.py``). Message names are ``protocol.py``'s. The results are written into a
dict owned by the caller, because Flower's ``run_simulation`` returns nothing.

The server holds arrays, never a model: preparation and server-side evaluation are
``evaluate`` messages that a client actor executes with the models it has cached anyway
(``client_app.server_task``), so the driver process imports neither torch nor
transformers. Such a message goes to the first partition's node and, if that fails, to
the next ones.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import psutil
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedrag_ray.config import ExperimentConfig
from fedrag_ray.federated.checkpoint import (
    RoundCheckpoint,
    RunLog,
    config_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from fedrag_ray.federated.params import from_record, record_nbytes, to_record
from fedrag_ray.federated.privacy import (
    PrivacyLedger,
    clipping_norm_of,
    composes_itself,
    noise_std_of,
    seed_noise,
    wrap_strategy,
)
from fedrag_ray.federated.privacy import aggregate_train as dp_aggregate_train
from fedrag_ray.federated.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    FULL_MODEL_BYTES_KEY,
    INDEX_SECONDS_KEY,
    METRICS_KEY,
    PARTITION_KEY,
    PER_QUESTION_KEY,
    SERVER_ROUND_KEY,
    TASK_EVALUATE,
    TASK_KEY,
    TASK_PREPARE,
    TRAIN_LOSS_KEY,
    TRAIN_SECONDS_KEY,
    UNIFORM_WEIGHT_KEY,
    WEIGHT_KEY,
)
from fedrag_ray.federated.ray_backend import SimulationNodes
from fedrag_ray.federated.sampling import ClientSampler
from fedrag_ray.federated.secagg import max_weight, secure_round
from fedrag_ray.federated.strategies import build_strategy, load_strategy_state, strategy_state
from fedrag_ray.federated.validation import InvalidUpdate, check_arrays, split_valid
from fedrag_ray.progress import ProgressFn, report
from fedrag_ray.stats import split_per_question

RoundCallback = Callable[[dict[str, Any]], None]
# Instead of training: work on the prepared federation (federated retrieval at inference,
# ``federated_retrieval``), given the grid, this server and the initial arrays.
InferenceFn = Callable[[Grid, "FederatedServer", dict[str, np.ndarray]], None]

# Flower's in-memory Grid sleeps 0.1 s between pulls for replies, which rounds every
# round's wall time up to the next 0.1 s, and each pull checks (under the state's lock)
# every outstanding message: O(messages x pulls) per round, a tenth of the driver's CPU at
# 1,000 per round. ``FederatedServer.send_and_receive`` looks every 10 ms for the messages
# that have a reply and pulls only those; every second it pulls all outstanding ones, so
# the replies Flower itself writes (a node gone, a message expired) still arrive.
PULL_INTERVAL_S = 0.01
FULL_PULL_INTERVAL_S = 1.0
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
        nodes: SimulationNodes | None = None,
        partitions: Sequence[Sequence[int]] | None = None,
        inference: InferenceFn | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        """``nodes``: the simulation's partition ↔ node mapping, published once the engine
        registered them; ``partitions``: each client's question indices (computed once,
        on the driver, and sent to a client with its train message); ``progress``: the
        clients of a round that replied so far, as replies arrive."""
        self.progress = progress
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
        self.nodes = nodes or SimulationNodes()
        self.partitions = partitions or []
        self.task_nodes: list[int] = []

    def send_and_receive(
        self, grid: Grid, messages: list[Message], stage: str | None = None
    ) -> list[Message]:
        """Flower's ``send_and_receive``; on the in-memory grid of a simulation, pulling
        only the messages that have a reply (see ``PULL_INTERVAL_S``)."""
        timeout = self.fed.round_timeout_s
        state = getattr(grid, "state", None)
        replied = getattr(state, "message_ins_id_to_message_res_id", None)
        lock = getattr(state, "lock", None)
        if replied is None or lock is None or not hasattr(grid, "pull_messages"):
            return list(grid.send_and_receive(messages, timeout=timeout))
        pending = set(grid.push_messages(messages))
        if stage:
            report(self.progress, stage, 0, len(messages))
        end = None if timeout is None else time.monotonic() + timeout
        full_pull_at = time.monotonic() + FULL_PULL_INTERVAL_S
        replies: list[Message] = []
        while pending and (end is None or time.monotonic() < end):
            if time.monotonic() >= full_pull_at:
                ready, full_pull_at = set(pending), time.monotonic() + FULL_PULL_INTERVAL_S
            else:
                with lock:
                    ready = pending & replied.keys()
            if ready:
                got = list(grid.pull_messages(ready))
                replies.extend(got)
                pending.difference_update(m.metadata.reply_to_message_id for m in got)
                if stage and got:
                    report(self.progress, stage, len(replies), len(messages))
            if pending:
                time.sleep(PULL_INTERVAL_S)
        return replies

    def server_task(
        self, grid: Grid, task: str, arrays: dict[str, np.ndarray] | None = None
    ) -> Message:
        """Run ``task`` (prepare / evaluate) on a client actor; the reply message."""
        errors = []
        record = to_record(arrays) if arrays is not None else None
        for node in self.task_nodes[:SERVER_TASK_TRIES]:
            content = RecordDict({CONFIG_KEY: ConfigRecord({TASK_KEY: task})})
            if record is not None:
                content[ARRAYS_KEY] = record
            msg = Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)
            for reply in self.send_and_receive(grid, [msg]):
                if not reply.has_error():
                    return reply
                errors.append(reply.error.reason)
        raise RuntimeError(f"server task {task!r} failed on every node tried: {errors[:3]}")

    def evaluate(self, grid: Grid, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """The metrics of ``arrays`` (with interval bounds) and, under ``per_question``,
        each question's scores (for the paired before/after interval)."""
        reply = self.server_task(grid, TASK_EVALUATE, arrays)
        scalars, per_question = split_per_question(dict(reply.content[METRICS_KEY].items()))
        return {**scalars, PER_QUESTION_KEY: per_question}

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
        ckpt = load_checkpoint(self.run_dir, self.fingerprint) if self.resume else None
        strategy, ledger = self.build_strategy(ckpt.extra.get("privacy", {}) if ckpt else {})
        pcfg = self.fed.privacy
        secagg = pcfg.secagg.enabled
        uniform = pcfg.mode == "central"
        log = RunLog(self.run_dir)
        history: list[dict[str, Any]] = log.load(ckpt.round) if ckpt else []
        if ckpt is None:
            log.reset()
        start_round = 1

        t = time.perf_counter()
        part_to_node = self.nodes.wait(self.fed.round_timeout_s)
        self.results["discovery_seconds"] = time.perf_counter() - t
        sampler = ClientSampler(self.cfg.seed, self.fed.sampled, self.partitions, part_to_node)
        self.task_nodes = [part_to_node[p] for p in sorted(part_to_node)[:SERVER_TASK_TRIES]]

        self.phase("preparing models and the global index on a client actor")
        t = time.perf_counter()
        prepared = self.server_task(grid, TASK_PREPARE)
        info = prepared.content[METRICS_KEY]
        self.results["full_model_bytes"] = int(info[FULL_MODEL_BYTES_KEY])
        self.results["index_seconds"] = float(info[INDEX_SECONDS_KEY])
        self.results["prepare_seconds"] = time.perf_counter() - t
        arrays = from_record(prepared.content[ARRAYS_KEY])
        t = time.perf_counter()
        self.prepare_knowledge()
        self.results["shards_seconds"] = time.perf_counter() - t
        if self.inference is not None:
            self.part_to_node = part_to_node
            self.inference(grid, self, arrays)
            return

        if ckpt is not None:
            arrays, start_round = ckpt.arrays, ckpt.round + 1
            load_strategy_state(strategy, ckpt.strategy_state)
        else:
            self.phase("evaluating the initial model")
            t = time.perf_counter()
            history.append(
                {"round": 0, **self.evaluate(grid, arrays), "seconds": time.perf_counter() - t}
            )
            log.append(history[-1])
            self.on_round(history[-1])
        self.results["resumed_from_round"] = start_round - 1
        self.results["first_round_started_at"] = time.time()
        # What exists now (the engine's 10^5 node contexts, the partitions, the models)
        # lives for the whole run. Frozen, Python's cyclic GC stops re-scanning it on each
        # of the collections that every round's messages trigger: at 10^5 registered
        # clients those scans cost milliseconds per client task. Unfrozen when the run ends
        # (``make_server_app``).
        gc.collect()
        gc.freeze()
        min_ok = self.fed.min_successes or 1

        for server_round in range(start_round, self.fed.rounds + 1):
            t0 = time.perf_counter()
            if ledger is not None:
                seed_noise(pcfg, server_round)
            config = ConfigRecord({SERVER_ROUND_KEY: server_round})
            messages = sampler.train_messages(strategy, server_round, to_record(arrays), config)
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
                replies = self.send_and_receive(grid, messages, f"round {server_round}: clients")
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
                "train_loss": float(np.mean([c[TRAIN_LOSS_KEY] for c in clients]))
                if clients
                else None,
                "client_compute_seconds": float(sum(c[TRAIN_SECONDS_KEY] for c in clients)),
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
            log.append(row)  # before the checkpoint: a resume drops rows past it
            save_checkpoint(
                self.run_dir,
                RoundCheckpoint(
                    round=server_round,
                    arrays=arrays,
                    strategy_state=strategy_state(strategy),
                    config_hash=self.fingerprint,
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
        finally:
            gc.unfreeze()

    return app
