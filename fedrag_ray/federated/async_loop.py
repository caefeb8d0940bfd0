"""FedBuff: asynchronous buffered aggregation on the simulated clock (``round_policy:
fedbuff``).

``concurrency`` (C) clients are in flight; each task carries the model version it was
dispatched with. Arrivals are processed in order of *simulated* completion (start + its
simulated seconds, ``clock.py``; ties: lower partition id), so a run is reproducible from
its seed whatever order Ray finished the work in. A task's duration is known only once
it has computed, so the free slots are dispatched together, as one ``send_and_receive``
batch (where Ray runs them concurrently), and every task in flight has computed before
the next arrival is processed; replacements go out after all arrivals of the same
simulated instant. Each arrival's update enters the buffer with weight num_examples x
(1 + staleness)^-a (staleness: server updates since its version); every ``buffer_size``
(M) arrivals the server applies ``clock.buffered_update`` and the version increases: one
row per server update (``federation.rounds`` of them), evaluated every ``eval_every``,
checkpointed after each.

Replacements are the ``ClientSampler``'s draw for round (version + 1) among the available
clients not in flight and not already started from this version (a client trains once per
version), so with M = K = C and equal durations FedBuff *is* synchronous FedAvg, bit for
bit. A client's LR-schedule round (and batch-order key) is its version + 1.

Resume: a checkpoint (after an update: the buffer is empty, no replacement sent yet)
holds the clock, the version and the tasks in flight (partition, start, version), and in
``aux_arrays`` the arrays of every older version one of them trains on. A resumed run
recomputes those tasks (a client's training is a function of its arrays and its
(partition, round) key), finishes the checkpoint's instant, and goes on exactly as the
uninterrupted run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fedrag_ray.federated.checkpoint import RoundCheckpoint, RunLog, save_checkpoint
from fedrag_ray.federated.clock import (
    SECONDS_PER_HOUR,
    buffered_update,
    staleness_weights,
)
from fedrag_ray.federated.params import from_record, record_nbytes, to_record
from fedrag_ray.federated.protocol import (
    ARRAYS_KEY,
    METRICS_KEY,
    SCHEDULE_ROUNDS_KEY,
    SERVER_ROUND_KEY,
    TRAIN_LOSS_KEY,
    TRAIN_SECONDS_KEY,
    TRAIN_TOKENS_KEY,
    WEIGHT_KEY,
)
from fedrag_ray.federated.sampling import ClientSampler
from fedrag_ray.federated.strategies import strategy_state
from fedrag_ray.federated.validation import InvalidUpdate, check_arrays, split_valid

if TYPE_CHECKING:
    from fedrag_ray.config import FederationConfig
    from fedrag_ray.federated.clock import SimClock
    from fedrag_ray.federated.privacy import PrivacyLedger

MAX_IDLE_HOURS = 24 * 14  # simulated hours the server waits for a client before giving up


class RoundServer(Protocol):
    """What this loop uses of ``server_app.FederatedServer`` (named here, not imported:
    the server imports this module)."""

    fed: FederationConfig
    clock: SimClock
    run_dir: str
    fingerprint: str
    sim_time: float

    def send_and_receive(
        self, grid: Grid, messages: list[Message], stage: str | None = None
    ) -> list[Message]: ...

    def evaluate_round(
        self, grid: Grid, row: dict[str, Any], arrays: dict[str, np.ndarray], server_round: int
    ) -> None: ...

    def on_round(self, row: dict[str, Any]) -> None: ...

    def peak_rss(self) -> int: ...


@dataclass
class Task:
    """One client task: dispatched at simulated ``start`` with ``version``'s arrays."""

    pid: int
    start: float
    version: int
    reply: Message | None = None
    finish: float = math.inf
    sim_seconds: float = 0.0


@dataclass
class Arrival:
    task: Task
    arrays: dict[str, np.ndarray]
    staleness: int
    weight: float
    metrics: dict[str, Any]


@dataclass
class FedBuff:
    """The asynchronous server's state between arrivals."""

    version: int
    clock: float
    arrays: dict[str, np.ndarray]
    versions: dict[int, dict[str, np.ndarray]]  # arrays of the versions tasks train on
    in_flight: list[Task] = field(default_factory=list)
    buffer: list[Arrival] = field(default_factory=list)
    started_here: set[int] = field(default_factory=set)  # started from this version
    sent: list[int] = field(default_factory=list)  # partitions dispatched since the update
    failed: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    last_update_clock: float = 0.0
    t0: float = field(default_factory=time.perf_counter)


def run_fedbuff(
    server: RoundServer,
    grid: Grid,
    sampler: ClientSampler,
    strategy: Any,
    ledger: PrivacyLedger | None,
    log: RunLog,
    history: list[dict[str, Any]],
    arrays: dict[str, np.ndarray],
    ckpt: RoundCheckpoint | None,
    schedule_rounds: int,
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Server updates until ``federation.rounds``; (history, final arrays)."""
    loop = AsyncLoop(server, grid, sampler, strategy, ledger, log, history, schedule_rounds)
    state = loop.restore(ckpt, arrays)
    if ckpt is None:
        loop.dispatch(state)
    else:  # the rest of the checkpoint's instant: its remaining arrivals, then dispatch
        loop.instant(state, state.clock)
    while state.version < server.fed.rounds:
        if state.in_flight:
            loop.instant(state, min(t.finish for t in state.in_flight))
        else:
            loop.idle(state)
    return history, state.arrays


class AsyncLoop:
    """The steps of :func:`run_fedbuff`, each a named method (as ``FederatedServer``'s)."""

    def __init__(
        self,
        server: RoundServer,
        grid: Grid,
        sampler: ClientSampler,
        strategy: Any,
        ledger: PrivacyLedger | None,
        log: RunLog,
        history: list[dict[str, Any]],
        schedule_rounds: int,
    ) -> None:
        self.server, self.grid, self.sampler = server, grid, sampler
        self.strategy, self.ledger, self.log = strategy, ledger, log
        self.history, self.schedule_rounds = history, schedule_rounds
        self.fed = server.fed
        self.policy = server.fed.round_policy
        self.clock = server.clock

    # ------------------------------------------------------------------ dispatch

    def restore(self, ckpt: RoundCheckpoint | None, arrays: dict[str, np.ndarray]) -> FedBuff:
        """A fresh state, or the checkpoint's with its tasks in flight recomputed."""
        if ckpt is None:
            return FedBuff(0, 0.0, arrays, {0: arrays})
        meta = ckpt.extra["fedbuff"]
        version, clock = int(ckpt.round), float(meta["clock"])
        versions: dict[int, dict[str, np.ndarray]] = {version: ckpt.arrays}
        for key, value in ckpt.aux_arrays.items():
            v, name = key.split("/", 1)
            versions.setdefault(int(v), {})[name] = value
        state = FedBuff(version, clock, ckpt.arrays, versions, last_update_clock=clock)
        tasks = [Task(int(p), float(s), int(v)) for p, s, v in meta["in_flight"]]
        self.compute(state, tasks)
        state.in_flight = tasks
        return state

    def dispatch(self, state: FedBuff) -> None:
        """Fill the free slots at the current simulated time (one batch, computed)."""
        free = self.fed.concurrency - len(state.in_flight)
        if free <= 0:
            return
        hour = int(state.clock // SECONDS_PER_HOUR)
        available = self.clock.available(state.clock, state.version + 1, hour)
        allowed = np.ones(self.fed.num_clients, dtype=bool) if available is None else available
        busy = [t.pid for t in state.in_flight] + sorted(state.started_here)
        allowed[np.asarray(busy, dtype=np.int64)] = False
        pids = self.sampler.sample(state.version + 1, free, allowed)
        tasks = [Task(p, state.clock, state.version) for p in pids]
        self.compute(state, tasks)
        state.in_flight.extend(tasks)
        state.started_here.update(pids)
        state.sent.extend(pids)

    def compute(self, state: FedBuff, tasks: list[Task]) -> None:
        """Train ``tasks`` (one ``send_and_receive`` batch: Ray runs them concurrently);
        each gets its reply, its simulated seconds and its finish time."""
        messages: list[Message] = []
        for v in sorted({t.version for t in tasks}):
            pids = [t.pid for t in tasks if t.version == v]
            config = ConfigRecord(
                {SERVER_ROUND_KEY: v + 1, SCHEDULE_ROUNDS_KEY: self.schedule_rounds}
            )
            record = to_record(state.versions[v])
            messages += self.sampler.train_messages(self.strategy, v + 1, record, config, pids)
        if not messages:
            return
        down = record_nbytes(messages[0].content[ARRAYS_KEY])
        stage = f"update {state.version + 1}: {len(messages)} clients"
        replies = self.server.send_and_receive(self.grid, messages, stage)
        by_id = {r.metadata.reply_to_message_id: r for r in replies}
        by_pid = {self.sampler.node_to_partition[m.metadata.dst_node_id]: m for m in messages}
        for task in tasks:
            task.reply = by_id.get(by_pid[task.pid].metadata.message_id)
            ok = task.reply is not None and not task.reply.has_error()
            up = record_nbytes(task.reply.content[ARRAYS_KEY]) if ok else 0
            tokens = task.reply.content[METRICS_KEY].get(TRAIN_TOKENS_KEY, 0) if ok else 0
            # a failed task frees its slot at once (its duration is unknown)
            seconds = self.clock.durations(np.array([task.pid]), [tokens], [down], [up])[0]
            task.sim_seconds = float(seconds) if ok else 0.0
            task.finish = task.start + task.sim_seconds
            state.bytes_sent += down
            state.bytes_received += up

    def idle(self, state: FedBuff) -> None:
        """No task in flight and none could be sent (no client available): apply a
        partial buffer if there is one, else let an hour of simulated time pass."""
        if state.buffer:
            self.update(state, note="buffer applied early: no client available")
        elif state.clock - state.last_update_clock > MAX_IDLE_HOURS * SECONDS_PER_HOUR:
            raise RuntimeError(
                f"fedbuff: no update for {MAX_IDLE_HOURS} simulated hours: every client "
                "was unavailable (federation.clients.profiles[].availability) or failed"
            )
        else:
            state.clock = (math.floor(state.clock / SECONDS_PER_HOUR) + 1) * SECONDS_PER_HOUR
        self.dispatch(state)

    # ------------------------------------------------------------------ arrivals

    def instant(self, state: FedBuff, at: float) -> None:
        """The arrivals finishing at simulated second ``at`` (by partition id), then
        the replacements for the slots they freed."""
        state.clock = at
        for task in sorted((t for t in state.in_flight if t.finish == at), key=_by_pid):
            self.arrive(state, task)
            if state.version >= self.fed.rounds:
                return
        self.dispatch(state)

    def arrive(self, state: FedBuff, task: Task) -> None:
        """One arrival: its (validated) update into the buffer; a server update at M."""
        state.in_flight.remove(task)
        reply = task.reply
        if reply is None or reply.has_error():
            state.failed.append("timeout" if reply is None else reply.error.reason)
            return
        base = state.versions[task.version]
        ok, rejected, _ = split_valid([reply], base, self.fed.validation.max_update_norm)
        if rejected:
            state.failed.extend(rejected)
            return
        metrics = dict(reply.content[METRICS_KEY].items())
        staleness = state.version - task.version
        weight = staleness_weights(
            [metrics[WEIGHT_KEY]], [staleness], self.policy.staleness_exponent
        )[0]
        arrays = from_record(reply.content[ARRAYS_KEY])
        state.buffer.append(Arrival(task, arrays, staleness, float(weight), metrics))
        task.reply = None  # the arrays live in the buffer now
        if len(state.buffer) >= (self.policy.buffer_size or 1):
            self.update(state)

    def update(self, state: FedBuff, note: str | None = None) -> None:
        """The server step on the buffer (in partition order), its row, evaluation and
        checkpoint; the version increases."""
        buffer = sorted(state.buffer, key=lambda a: a.task.pid)
        candidate = buffered_update(
            state.arrays,
            [a.arrays for a in buffer],
            [state.versions[a.task.version] for a in buffer],
            [a.staleness for a in buffer],
            [a.weight for a in buffer],
            self.policy.server_lr,
        )
        extra: dict[str, Any] = {"buffer_note": note} if note else {}
        try:  # last guard: never let a corrupt aggregate into the model
            check_arrays(candidate, state.arrays)
            aggregated = True
        except InvalidUpdate as err:
            candidate, aggregated = state.arrays, False
            extra["not_aggregated"] = f"aggregate rejected: {err}"
        if self.ledger is not None and self.fed.privacy.mode == "local":
            self.ledger.compose_round(1)  # each reply was itself a (local-DP) release
            extra |= self.ledger.row()
        state.version += 1
        state.arrays = candidate
        state.versions[state.version] = candidate
        row = self.row(state, buffer, aggregated, extra)
        self.server.evaluate_round(self.grid, row, state.arrays, state.version)
        self.reset(state)
        self.record(state, row)

    def row(
        self, state: FedBuff, buffer: list[Arrival], aggregated: bool, extra: dict[str, Any]
    ) -> dict[str, Any]:
        """The server update's row: as a synchronous round's, with staleness and the
        simulated clock."""
        names, tier_of = self.clock.names, self.clock.tier_of
        clients = [
            {k: v for k, v in a.metrics.items() if k != WEIGHT_KEY}
            | {"num_examples": a.metrics[WEIGHT_KEY], "tier": names[tier_of[a.task.pid]]}
            | {"sim_seconds": a.task.sim_seconds, "dropped": False}
            | {"staleness": a.staleness, "version_received": a.task.version}
            | {"weight": a.weight}
            for a in buffer
        ]
        reached = [a.task.pid for a in buffer] if aggregated else []
        return {
            "round": state.version,
            "sampled": len(state.sent),
            "succeeded": len(buffer),
            "failed": len(state.failed),
            "failure_reasons": state.failed[:8],
            "aggregated": aggregated,
            **extra,
            "bytes_sent": state.bytes_sent,
            "bytes_received": state.bytes_received,
            "train_loss": float(np.mean([c[TRAIN_LOSS_KEY] for c in clients])),
            "client_compute_seconds": float(sum(c[TRAIN_SECONDS_KEY] for c in clients)),
            "round_seconds": time.perf_counter() - state.t0,
            "staleness_mean": float(np.mean([a.staleness for a in buffer])),
            "staleness_max": int(max(a.staleness for a in buffer)),
            "sim_seconds": state.clock - state.last_update_clock,
            "sim_time": state.clock,
            "stragglers_dropped": 0,
            "stragglers": [],
            "tier_sent": _tier_counts(names, tier_of, state.sent),
            "tier_reached": _tier_counts(names, tier_of, reached),
            "clients": clients,
        }

    def reset(self, state: FedBuff) -> None:
        """After an update: an empty buffer and counters; only the versions that tasks
        in flight still train on (and the current one) are kept."""
        state.buffer, state.sent, state.failed = [], [], []
        state.started_here = set()
        state.bytes_sent = state.bytes_received = 0
        state.last_update_clock = state.clock
        keep = {t.version for t in state.in_flight} | {state.version}
        state.versions = {v: a for v, a in state.versions.items() if v in keep}

    def record(self, state: FedBuff, row: dict[str, Any]) -> None:
        """Log the row, checkpoint (clock, version, tasks in flight, their versions'
        arrays), report; then time the next update."""
        row["peak_rss_bytes"] = self.server.peak_rss()
        row["seconds"] = time.perf_counter() - state.t0
        self.history.append(row)
        self.log.append(row)  # before the checkpoint: a resume drops rows past it
        self.server.sim_time = state.clock
        self.checkpoint(state)
        self.server.on_round(row)
        state.t0 = time.perf_counter()

    def checkpoint(self, state: FedBuff) -> None:
        extra: dict[str, Any] = {
            "schedule_rounds": self.schedule_rounds,
            "sim_time": state.clock,
            "fedbuff": {
                "clock": state.clock,
                "in_flight": [[t.pid, t.start, t.version] for t in state.in_flight],
            },
        }
        if self.ledger is not None:
            extra["privacy"] = self.ledger.state()
        aux = {
            f"{v}/{name}": a
            for v, arrays in sorted(state.versions.items())
            if v != state.version
            for name, a in arrays.items()
        }
        save_checkpoint(
            self.server.run_dir,
            RoundCheckpoint(
                round=state.version,
                arrays=state.arrays,
                strategy_state=strategy_state(self.strategy),
                config_hash=self.server.fingerprint,
                extra=extra,
                aux_arrays=aux,
            ),
        )


def _by_pid(task: Task) -> int:
    return task.pid


def _tier_counts(names: list[str], tier_of: np.ndarray, pids: list[int]) -> dict[str, int]:
    counts = np.bincount(tier_of[np.asarray(pids, dtype=np.int64)], minlength=len(names))
    return dict(zip(names, counts.tolist(), strict=True))
