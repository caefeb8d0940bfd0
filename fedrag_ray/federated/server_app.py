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
(``checkpoint.py``). Message names are ``protocol.py``'s. ``FederatedServer.run`` is that
loop, flat, with each step a named method (in the manner of Flower's ``Strategy.start``),
and returns a :class:`ServerResult`; the ServerApp keeps it on the server, since Flower's
``run_simulation`` returns nothing.

The server holds arrays, never a model: preparation and server-side evaluation are
``evaluate`` messages that a client actor executes with the models it has cached anyway
(``client_tasks``), so the driver process imports neither torch nor
transformers. Such a message goes to the first partition's node and, if that fails, to
the next ones.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedrag_ray import compat
from fedrag_ray.config import ExperimentConfig
from fedrag_ray.federated.checkpoint import (
    RoundCheckpoint,
    RunLog,
    config_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from fedrag_ray.federated.clock import SimClock, round_cut
from fedrag_ray.federated.params import from_record, record_nbytes, to_record
from fedrag_ray.federated.privacy import (
    PrivacyLedger,
    clipping_norm_of,
    composes_itself,
    noise_rng,
    noise_std_of,
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
    SCHEDULE_ROUNDS_KEY,
    SERVER_ROUND_KEY,
    TASK_EVALUATE,
    TASK_KEY,
    TASK_PREPARE,
    TRAIN_LOSS_KEY,
    TRAIN_SECONDS_KEY,
    TRAIN_TOKENS_KEY,
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

logger = logging.getLogger(__name__)
RoundCallback = Callable[[dict[str, Any]], None]
# Instead of training: work on the prepared federation (federated retrieval at inference,
# ``federated_retrieval``), given the grid, this server and the initial arrays; what it
# returns is the run's result (``ServerResult.task``).
FederationTask = Callable[[Grid, "FederatedServer", dict[str, np.ndarray]], dict[str, Any]]

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


@dataclass
class ServerResult:
    """What a federation's server loop hands back (``FederatedServer.run``)."""

    full_model_bytes: int = 0
    timings: dict[str, Any] = field(default_factory=dict)  # discovery/prepare/index/shards
    history: list[dict[str, Any]] = field(default_factory=list)
    final_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    resumed_from_round: int = 0
    privacy: dict[str, Any] | None = None
    secure_aggregation: dict[str, Any] | None = None
    task: dict[str, Any] | None = None  # a FederationTask's output, instead of rounds
    heterogeneity: dict[str, Any] | None = None  # tiers, policy, per-tier figures (clock.py)


@dataclass
class RoundOutcome:
    """One round's replies after the exchange (plain or SecAgg+) and validation."""

    ok: list[Message]
    failed: list[str]
    bytes_sent: int
    bytes_received: int
    norms: dict[int, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # the simulated clock (clock.py): seconds per reply of ``ok`` and ``dropped`` (by
    # partition), the replies a deadline or over-selection cut, the round's duration
    sim: dict[int, float] = field(default_factory=dict)
    dropped: list[Message] = field(default_factory=list)
    sim_seconds: float = 0.0


class FederatedServer:
    def __init__(
        self,
        cfg: ExperimentConfig,
        cfg_json: str,
        run_dir: str,
        resume: bool = False,
        on_round: RoundCallback | None = None,
        prepare_knowledge: Callable[[], None] | None = None,
        on_phase: Callable[[str], None] | None = None,
        nodes: SimulationNodes | None = None,
        partitions: Sequence[Sequence[int]] | None = None,
        task: FederationTask | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        """``nodes``: the simulation's partition ↔ node mapping, published once the engine
        registered them; ``partitions``: each client's question indices (computed once,
        on the driver, and sent to a client with its train message); ``task``: work on
        the prepared federation instead of training rounds (federated retrieval);
        ``progress``: the clients of a round that replied so far, as replies arrive."""
        self.progress = progress
        assert cfg.federation is not None
        self.cfg = cfg
        self.fed = cfg.federation
        self.run_dir = run_dir
        self.resume = resume
        self.on_round = on_round or (lambda _row: None)
        self.prepare_knowledge = prepare_knowledge or (lambda: None)
        self.phase = on_phase or (lambda _msg: None)
        self.fingerprint = config_fingerprint(cfg_json)
        self.nodes = nodes or SimulationNodes()
        self.partitions = partitions or []
        self.task = task
        self.part_to_node: dict[int, int] = {}  # filled when the engine registered nodes
        self.task_nodes: list[int] = []  # where server tasks go, in order of preference
        self.result: ServerResult | None = None  # set by make_server_app's main
        self.error: BaseException | None = None
        self.clock = SimClock.from_config(self.fed, cfg.seed)
        self.sim_time = 0.0  # simulated seconds since round 1 started (restored on resume)

    # ------------------------------------------------------------------ the run

    def run(self, grid: Grid) -> ServerResult:
        """Prepare the federation, then train the rounds (in the manner of Flower's
        ``Strategy.start``: configure → send and receive → aggregate → evaluate, here
        with validation, privacy accounting and a checkpoint per round), or run the
        task on the prepared federation."""
        result = ServerResult()
        ckpt = load_checkpoint(self.run_dir, self.fingerprint) if self.resume else None
        sampler = self.discover_nodes(result)
        arrays = self.prepare(grid, result)
        if self.task is not None:
            result.task = self.task(grid, self, arrays)
            return result
        strategy, ledger = self.build_strategy(ckpt.extra.get("privacy", {}) if ckpt else {})
        log = RunLog(self.run_dir)
        history, arrays, start_round = self.starting_point(grid, log, ckpt, strategy, arrays)
        schedule_rounds = self.schedule_rounds(ckpt)
        result.resumed_from_round = start_round - 1
        result.timings["first_round_started_at"] = time.time()
        self.sim_time = float(ckpt.extra.get("sim_time", 0.0)) if ckpt else 0.0
        if self.fed.round_policy.type == "fedbuff":
            from fedrag_ray.federated.async_loop import run_fedbuff

            with frozen_gc():
                history, arrays = run_fedbuff(
                    self,
                    grid,
                    sampler,
                    strategy,
                    ledger,
                    log,
                    history,
                    arrays,
                    ckpt,
                    schedule_rounds,
                )
            return self.finish(result, history, arrays, ledger)
        with frozen_gc():
            for server_round in range(start_round, self.fed.rounds + 1):
                t0 = time.perf_counter()
                pids, notes = self.round_clients(sampler, server_round)
                messages = self.configure_round(
                    sampler, strategy, server_round, schedule_rounds, arrays, pids
                )
                outcome = self.exchange(grid, messages, arrays, server_round)
                self.apply_clock(outcome, messages)
                clients = self.client_rows(outcome)
                arrays, aggregated = self.aggregate(
                    strategy, ledger, server_round, outcome, arrays, len(messages)
                )
                row = self.round_row(server_round, messages, outcome, clients, aggregated, t0)
                row |= notes | self.clock_row(pids, outcome, aggregated)
                self.evaluate_round(grid, row, arrays, server_round)
                row["peak_rss_bytes"] = process_tree_rss()
                row["seconds"] = time.perf_counter() - t0
                history.append(row)
                log.append(row)  # before the checkpoint: a resume drops rows past it
                self.checkpoint(server_round, arrays, strategy, ledger, schedule_rounds)
                self.on_round(row)
        return self.finish(result, history, arrays, ledger)

    def finish(
        self,
        result: ServerResult,
        history: list[dict[str, Any]],
        arrays: dict[str, np.ndarray],
        ledger: PrivacyLedger | None,
    ) -> ServerResult:
        """The result of the rounds: history, final arrays, privacy and tier figures."""
        from fedrag_ray.federated.clock import tier_report

        result.history, result.final_arrays = history, arrays
        result.privacy = ledger.summary(self.fed) if ledger is not None else None
        result.secure_aggregation = self.secure_aggregation_summary()
        sizes = np.array([len(p) for p in self.partitions], dtype=np.int64)
        result.heterogeneity = {
            "round_policy": self.fed.round_policy.model_dump(),
            "sim_time": self.sim_time,
            **self.clock.assignment(),
            "per_tier": tier_report(self.clock, history, sizes),
        }
        return result

    @staticmethod
    def peak_rss() -> int:
        """The process tree's resident memory now (a round row's ``peak_rss_bytes``)."""
        return process_tree_rss()

    # ------------------------------------------------------------------ before round 1

    def discover_nodes(self, result: ServerResult) -> ClientSampler:
        """The partition → node mapping the engine registered, and the round sampler."""
        t = time.perf_counter()
        self.part_to_node = self.nodes.wait(self.fed.round_timeout_s)
        result.timings["discovery_seconds"] = time.perf_counter() - t
        self.task_nodes = [
            self.part_to_node[p] for p in sorted(self.part_to_node)[:SERVER_TASK_TRIES]
        ]
        return ClientSampler(
            self.cfg.seed,
            self.fed.sampled,
            self.partitions,
            self.part_to_node,
            self.clock.client_local_steps(),
        )

    def prepare(self, grid: Grid, result: ServerResult) -> dict[str, np.ndarray]:
        """A client actor builds (or checks) the global index and returns the initial
        arrays; then the caller builds the private shards from that index."""
        self.phase("preparing models and the global index on a client actor")
        t = time.perf_counter()
        prepared = self.server_task(grid, TASK_PREPARE)
        info = prepared.content[METRICS_KEY]
        result.full_model_bytes = int(info[FULL_MODEL_BYTES_KEY])
        result.timings["index_seconds"] = float(info[INDEX_SECONDS_KEY])
        result.timings["prepare_seconds"] = time.perf_counter() - t
        arrays = from_record(prepared.content[ARRAYS_KEY])
        t = time.perf_counter()
        self.prepare_knowledge()
        result.timings["shards_seconds"] = time.perf_counter() - t
        return arrays

    def starting_point(
        self,
        grid: Grid,
        log: RunLog,
        ckpt: RoundCheckpoint | None,
        strategy: Any,
        arrays: dict[str, np.ndarray],
    ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], int]:
        """(history so far, arrays, first round): the checkpoint's on resume, else the
        initial arrays after their evaluation (round 0; skipped with ``eval.before: false``)."""
        if ckpt is not None:
            load_strategy_state(strategy, ckpt.strategy_state)
            return log.load(ckpt.round), ckpt.arrays, ckpt.round + 1
        log.reset()
        t = time.perf_counter()
        row: dict[str, Any] = {"round": 0}
        if self.cfg.eval.before:  # off when the initial model's figures are known already
            self.phase("evaluating the initial model")
            row.update(self.evaluate(grid, arrays))
        row["seconds"] = time.perf_counter() - t
        log.append(row)
        self.on_round(row)
        return [row], arrays, 1

    def schedule_rounds(self, ckpt: RoundCheckpoint | None) -> int:
        """The rounds the LR schedule spans: ``federation.rounds`` of a fresh run; on
        resume those the run was started with (its checkpoint's), so rounds 1..R of a run
        resumed with more rounds train exactly as the R-round run, and the rounds past R
        at the schedule's end (``min_lr_ratio``). A checkpoint from before this was
        recorded gives today's ``federation.rounds`` (the old behaviour), with a warning."""
        if ckpt is None:
            return self.fed.rounds
        recorded = ckpt.extra.get("schedule_rounds")
        if recorded is None:
            logger.warning(
                "checkpoint in %s does not record the rounds its LR schedule spans; "
                "using federation.rounds = %d",
                self.run_dir,
                self.fed.rounds,
            )
            return self.fed.rounds
        return int(recorded)

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

    # ------------------------------------------------------------------ one round

    def configure_round(
        self,
        sampler: ClientSampler,
        strategy: Any,
        server_round: int,
        schedule_rounds: int,
        arrays: dict[str, np.ndarray],
        pids: Sequence[int] | None = None,
    ) -> list[Message]:
        """The round's train messages (``pids``, else its sampled clients, in partition
        order)."""
        config = ConfigRecord(
            {SERVER_ROUND_KEY: server_round, SCHEDULE_ROUNDS_KEY: schedule_rounds}
        )
        return sampler.train_messages(strategy, server_round, to_record(arrays), config, pids)

    def round_clients(
        self, sampler: ClientSampler, server_round: int
    ) -> tuple[list[int], dict[str, Any]]:
        """The round's clients among those available at its simulated start (all of them
        without availability patterns): K, or ceil(K (1 + o)) under over-selection; and
        a note for the row when fewer were available than wanted."""
        policy, want = self.fed.round_policy, self.fed.sampled
        if policy.type == "over_selection":
            assert policy.over_selection is not None
            want = min(self.fed.num_clients, math.ceil(want * (1 + policy.over_selection)))
        available = self.clock.available(self.sim_time, server_round)
        pids = sampler.sample(server_round, want, available)
        if available is None or len(pids) >= want:
            return pids, {}
        return pids, {"available": int(available.sum()), "wanted": want}

    def apply_clock(self, outcome: RoundOutcome, messages: list[Message]) -> None:
        """Each reply's simulated seconds (``clock.py``); a deadline or over-selection
        moves the replies it cuts from ``outcome.ok`` to ``outcome.dropped``, in
        partition order, before aggregation. Without profiles: nothing to compute."""
        if not self.clock.heterogeneous or not outcome.ok:
            return
        ok = outcome.ok
        pids = np.array([_pid(r) for r in ok], dtype=np.int64)
        down = record_nbytes(messages[0].content[ARRAYS_KEY]) if messages else 0
        up = [record_nbytes(r.content[ARRAYS_KEY]) if ARRAYS_KEY in r.content else 0 for r in ok]
        tokens = [r.content[METRICS_KEY].get(TRAIN_TOKENS_KEY, 0) for r in ok]
        durations = self.clock.durations(pids, np.asarray(tokens), np.full(len(ok), down), up)
        kept, outcome.sim_seconds = round_cut(
            self.fed.round_policy, pids, durations, self.fed.sampled
        )
        outcome.sim = dict(zip(pids.tolist(), durations.tolist(), strict=True))
        outcome.ok = [r for r, k in zip(ok, kept, strict=True) if k]
        outcome.dropped = [r for r, k in zip(ok, kept, strict=True) if not k]

    def clock_row(
        self, pids: Sequence[int], outcome: RoundOutcome, aggregated: bool
    ) -> dict[str, Any]:
        """The round's figures on the simulated clock: its seconds, the run's simulated
        time after it, the stragglers cut (named, with their tier), and per tier the
        tasks sent and those whose update reached the model."""
        self.sim_time += outcome.sim_seconds
        names, tier_of = self.clock.names, self.clock.tier_of
        reached = [_pid(r) for r in outcome.ok] if aggregated else []
        return {
            "sim_seconds": outcome.sim_seconds,
            "sim_time": self.sim_time,
            "stragglers_dropped": len(outcome.dropped),
            "stragglers": [
                {"partition-id": p, "tier": names[tier_of[p]]}
                for p in (_pid(r) for r in outcome.dropped)
            ],
            "tier_sent": _tier_counts(names, tier_of, pids),
            "tier_reached": _tier_counts(names, tier_of, reached),
        }

    def exchange(
        self, grid: Grid, messages: list[Message], arrays: dict[str, np.ndarray], server_round: int
    ) -> RoundOutcome:
        """Send the train messages and keep the valid replies, in partition order:
        through SecAgg+ (the server only ever holds the sum, ``secagg.py``) or plainly,
        dropping failed replies and those that fail validation (reasons kept)."""
        pcfg = self.fed.privacy
        if pcfg.secagg.enabled:
            sr = secure_round(
                grid,
                messages,
                arrays,
                pcfg.secagg,
                server_round,
                self.fed.round_timeout_s,
                pcfg.mode == "central",
                max_weight(pcfg.secagg, self.fed, self.cfg.train.batch_size),
            )
            outcome = RoundOutcome(sr.replies, sr.failures, sr.bytes_sent, sr.bytes_received)
            outcome.extra["secagg_seconds"] = sr.seconds
        else:
            bytes_down = sum(record_nbytes(m.content[ARRAYS_KEY]) for m in messages)
            replies = self.send_and_receive(grid, messages, f"round {server_round}: clients")
            ok = [r for r in replies if not r.has_error()]
            failed = [r.error.reason for r in replies if r.has_error()]
            failed += ["timeout"] * (len(messages) - len(replies))
            bytes_up = sum(record_nbytes(r.content[ARRAYS_KEY]) for r in ok)
            ok, rejected, norms = split_valid(ok, arrays, self.fed.validation.max_update_norm)
            outcome = RoundOutcome(ok, failed + rejected, bytes_down, bytes_up, norms)
            outcome.extra["rejected"] = len(rejected)
        outcome.ok.sort(key=_pid)
        return outcome

    def aggregate(
        self,
        strategy: Any,
        ledger: PrivacyLedger | None,
        server_round: int,
        outcome: RoundOutcome,
        arrays: dict[str, np.ndarray],
        sampled: int,
    ) -> tuple[dict[str, np.ndarray], bool]:
        """The strategy's aggregate of the successful replies (in Flower's DP wrapper
        when configured; the ledger composes ε), if enough replied and it passes the
        last validity check; else the arrays as they were. Notes go to ``outcome.extra``."""
        pcfg = self.fed.privacy
        uniform = pcfg.mode == "central"
        ok, extra = outcome.ok, outcome.extra
        min_ok = self.fed.min_successes or 1
        if uniform:
            for r in ok:
                r.content[METRICS_KEY][UNIFORM_WEIGHT_KEY] = 1
        if ledger is not None and uniform:
            extra["dp_clipping_norm"] = clipping_norm_of(strategy)
            extra["dp_noise_std"] = noise_std_of(strategy)
        aggregated = False
        if len(ok) < min_ok:
            extra["not_aggregated"] = f"{len(ok)} successful clients < min_successes {min_ok}"
        else:
            with noise_rng(pcfg, server_round):  # Flower's DP noise: NumPy's global RNG
                new_arrays, _ = dp_aggregate_train(strategy, server_round, ok)
            if new_arrays is None:
                extra["not_aggregated"] = (
                    f"Flower's DP wrapper releases only when all {sampled} sampled "
                    f"clients reply ({len(ok)} did): nothing released, no ε spent"
                    if composes_itself(strategy) and len(ok) != sampled
                    else "the strategy returned no aggregate"
                )
            else:
                candidate = from_record(new_arrays)
                try:  # last guard: never let a corrupt aggregate into the model
                    check_arrays(candidate, arrays)
                    arrays, aggregated = candidate, True
                except InvalidUpdate as err:
                    extra["not_aggregated"] = f"aggregate rejected: {err}"
                if ledger is not None and uniform and not composes_itself(strategy):
                    ledger.compose_round(len(ok))
        if ledger is not None and pcfg.mode == "local" and ok:
            ledger.compose_round(1)  # each reply was itself a (local-DP) release
        if ledger is not None:
            extra |= ledger.row()
        return arrays, aggregated

    def client_rows(self, outcome: RoundOutcome) -> list[dict[str, Any]]:
        """Each successful client's own metrics (and update norm), as it replied; on the
        simulated clock (profiles) with its tier, simulated seconds and whether a
        deadline / over-selection dropped it (without profiles: the rows as they were)."""
        names, tier_of = self.clock.names, self.clock.tier_of
        timed = self.clock.heterogeneous
        return [
            {k: v for k, v in r.content[METRICS_KEY].items() if k != WEIGHT_KEY}
            | {"num_examples": r.content[METRICS_KEY][WEIGHT_KEY]}
            | ({"update-norm": outcome.norms[pid]} if (pid := _pid(r)) in outcome.norms else {})
            | (
                {"tier": names[tier_of[pid]], "sim_seconds": outcome.sim[pid], "dropped": dropped}
                if timed
                else {}
            )
            for rs, dropped in ((outcome.ok, False), (outcome.dropped, True))
            for r in rs
        ]

    @staticmethod
    def round_row(
        server_round: int,
        messages: list[Message],
        outcome: RoundOutcome,
        clients: list[dict[str, Any]],
        aggregated: bool,
        t0: float,
    ) -> dict[str, Any]:
        """The round's row of the run log: counts, failures, bytes, the clients' rows,
        before evaluation."""
        return {
            "round": server_round,
            "sampled": len(messages),
            "succeeded": len(outcome.ok),
            "failed": len(outcome.failed),
            "failure_reasons": outcome.failed[:8],
            "aggregated": aggregated,
            **outcome.extra,
            "bytes_sent": outcome.bytes_sent,
            "bytes_received": outcome.bytes_received,
            "train_loss": float(np.mean(losses)) if (losses := _kept_losses(clients)) else None,
            "client_compute_seconds": float(sum(c[TRAIN_SECONDS_KEY] for c in clients)),
            "round_seconds": time.perf_counter() - t0,
            "clients": clients,
        }

    def evaluate_round(
        self, grid: Grid, row: dict[str, Any], arrays: dict[str, np.ndarray], server_round: int
    ) -> None:
        """Server-side evaluation every ``eval_every`` rounds and after the last."""
        if server_round % self.fed.eval_every == 0 or server_round == self.fed.rounds:
            t = time.perf_counter()
            row.update(self.evaluate(grid, arrays))
            row["eval_seconds"] = time.perf_counter() - t

    def checkpoint(
        self,
        server_round: int,
        arrays: dict[str, np.ndarray],
        strategy: Any,
        ledger: PrivacyLedger | None,
        schedule_rounds: int,
    ) -> None:
        """The atomic checkpoint a resume starts from (``checkpoint.py``)."""
        extra: dict[str, Any] = {"schedule_rounds": schedule_rounds, "sim_time": self.sim_time}
        if ledger is not None:
            extra["privacy"] = {**ledger.state(), "clipping_norm": clipping_norm_of(strategy)}
        save_checkpoint(
            self.run_dir,
            RoundCheckpoint(
                round=server_round,
                arrays=arrays,
                strategy_state=strategy_state(strategy),
                config_hash=self.fingerprint,
                extra=extra,
            ),
        )

    def secure_aggregation_summary(self) -> dict[str, Any] | None:
        pcfg = self.fed.privacy
        if not pcfg.secagg.enabled:
            return None
        return {
            "protocol": "SecAgg+ (Flower SecAggPlusWorkflow + secaggplus_mod)",
            **pcfg.secagg.model_dump(),
            "max_weight": max_weight(pcfg.secagg, self.fed, self.cfg.train.batch_size),
        }

    # ------------------------------------------------------------------ messaging

    def send_and_receive(
        self, grid: Grid, messages: list[Message], stage: str | None = None
    ) -> list[Message]:
        """Flower's ``send_and_receive``; on the in-memory grid of a simulation, pulling
        only the messages that have a reply (see ``PULL_INTERVAL_S``)."""
        timeout = self.fed.round_timeout_s
        internals = compat.grid_internals(grid)
        if internals is None:
            return list(grid.send_and_receive(messages, timeout=timeout))
        replied, lock = internals
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

    def send_to_any_node(self, grid: Grid, content: RecordDict, what: str) -> Message:
        """``content`` as an ``evaluate`` message to the first server-task node, then the
        next ones (at most ``SERVER_TASK_TRIES``) while they fail; the first good reply.
        The one retry-on-another-node loop: server tasks and federated retrieval's
        answer generation both use it."""
        errors = []
        for node in self.task_nodes[:SERVER_TASK_TRIES]:
            msg = Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)
            for reply in self.send_and_receive(grid, [msg]):
                if not reply.has_error():
                    return reply
                errors.append(reply.error.reason)
        raise RuntimeError(f"{what} failed on every node tried: {errors[:3]}")

    def server_task(
        self, grid: Grid, task: str, arrays: dict[str, np.ndarray] | None = None
    ) -> Message:
        """Run ``task`` (prepare / evaluate) on a client actor; the reply message."""
        content = RecordDict({CONFIG_KEY: ConfigRecord({TASK_KEY: task})})
        if arrays is not None:
            content[ARRAYS_KEY] = to_record(arrays)
        return self.send_to_any_node(grid, content, f"server task {task!r}")

    def evaluate(self, grid: Grid, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """The metrics of ``arrays`` (with interval bounds) and, under ``per_question``,
        each question's scores (for the paired before/after interval)."""
        reply = self.server_task(grid, TASK_EVALUATE, arrays)
        scalars, per_question = split_per_question(dict(reply.content[METRICS_KEY].items()))
        return {**scalars, PER_QUESTION_KEY: per_question}


def _pid(reply: Message) -> int:
    return int(reply.content[METRICS_KEY][PARTITION_KEY])


def _kept_losses(clients: list[dict[str, Any]]) -> list[float]:
    """The train losses of the clients whose update was aggregated (not cut)."""
    return [c[TRAIN_LOSS_KEY] for c in clients if not c.get("dropped")]


def _tier_counts(names: list[str], tier_of: np.ndarray, pids: Sequence[int]) -> dict[str, int]:
    counts = np.bincount(tier_of[np.asarray(pids, dtype=np.int64)], minlength=len(names))
    return dict(zip(names, counts.tolist(), strict=True))


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """What exists when the rounds start (the engine's 10^5 node contexts, the partitions,
    the models) lives for the whole run. Frozen, Python's cyclic GC stops re-scanning it
    on each of the collections that every round's messages trigger: at 10^5 registered
    clients those scans cost milliseconds per client task. Unfrozen on every way out."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def make_server_app(server: FederatedServer) -> ServerApp:
    """Flower's ServerApp around ``server.run``. ``run_simulation`` returns nothing and
    swallows the ServerApp's errors, so the server keeps what its run returned
    (``server.result``) or raised (``server.error``) for the session to read."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            server.result = server.run(grid)
        except BaseException as err:
            server.error = err
            raise

    return app
