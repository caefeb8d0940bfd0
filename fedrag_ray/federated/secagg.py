"""Secure aggregation with Flower's SecAgg+ inside fedrag_ray's Message-API round loop.

Flower 1.41 ships SecAgg+ as two parts: ``secaggplus_mod`` (client) and
``SecAggPlusWorkflow`` (server). Both are used unchanged. What cannot serve this round
loop as shipped, and why:

- ``SecAggPlusWorkflow.__call__`` needs a ``LegacyContext``: a *legacy* strategy
  (``configure_fit`` / ``aggregate_fit`` on ``ClientProxy`` + ``FitIns``/``FitRes``) and
  a ``ClientManager``; fedrag_ray's strategies are Message-API ones
  (``configure_train`` / ``aggregate_train`` on ``Message``). :func:`secure_round`
  therefore gives the workflow a :class:`_RoundStrategy` — it hands out the messages the
  real strategy configured, as ``FitIns``, and captures the unmasked aggregate instead of
  aggregating — and then passes that aggregate to the real strategy (as Flower's own
  workflow does for legacy strategies: every result carries the aggregate).
- ``secaggplus_mod`` calls the train handler with the legacy ``fitins.*`` records and
  expects ``fitres.*`` back; fedrag_ray's handler speaks ``arrays``/``config`` →
  ``arrays``/``metrics``. :func:`secagg_bridge_mod` translates, sends the *update*
  (trained minus received: a small range, so less quantisation error than weights) and
  restores the array names that Flower's legacy ``Parameters`` drop.
- Per-client validation (``validation.py``) is impossible by design — the server never
  holds one client's update; the aggregate is checked instead. A client's influence per
  entry is bounded by ``clipping_range`` (SecAgg+ clips before quantising), and the bridge
  refuses to mask a non-finite update (an honest client's self-check only).

The server learns the weighted sum of the updates (weights: ``num-examples``, or 1 each
under central DP) and each client's scalar metrics; dropouts after key sharing are
recovered from the neighbours' shares while at least ``reconstruction_threshold``
neighbours remain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    bytes_to_ndarray,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedrag_ray.config import FederationConfig, SecAggConfig
from fedrag_ray.federated.params import from_record, to_record
from fedrag_ray.federated.protocol import (
    ARRAY_NAMES_KEY,
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    UNIFORM_KEY,
    WEIGHT_KEY,
)


def content_nbytes(content: RecordDict) -> int:
    """Payload bytes of a message: array data and the bytes in config records (keys,
    shares, masked vectors)."""
    n = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    for rec in content.config_records.values():
        for v in rec.values():
            if isinstance(v, bytes):
                n += len(v)
            elif isinstance(v, list):
                n += sum(len(x) for x in v if isinstance(x, bytes))
    return n


def secagg_bridge_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Client mod between ``secaggplus_mod`` and the Message-API train handler."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    names = str(config.pop(ARRAY_NAMES_KEY)).split("\n")
    uniform = bool(config.pop(UNIFORM_KEY, 0))
    tensors = fitins.parameters.tensors
    received = {n: bytes_to_ndarray(t) for n, t in zip(names, tensors, strict=True)}
    msg.content = RecordDict(
        {ARRAYS_KEY: to_record(received), CONFIG_KEY: ConfigRecord(config)}  # type: ignore[arg-type]
    )
    out = call_next(msg, ctxt)
    if out.has_error():
        raise RuntimeError(out.error.reason)
    trained = from_record(out.content[ARRAYS_KEY])
    if set(trained) != set(names):
        raise ValueError("secagg: the reply's arrays differ from the ones received")
    deltas = []
    for n in names:
        if trained[n].shape != received[n].shape:
            raise ValueError(f"secagg: wrong shape for {n}: {trained[n].shape}")
        d = trained[n].astype(np.float64) - received[n]
        if not np.all(np.isfinite(d)):
            raise ValueError(f"secagg: non-finite update in {n}; not sent to the secure sum")
        deltas.append(d)
    metrics = dict(out.content[METRICS_KEY])
    weight = 1 if uniform else int(metrics[WEIGHT_KEY])
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(deltas), weight, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


class _RoundStrategy(LegacyStrategy):
    """The legacy strategy SecAggPlusWorkflow needs: it hands out this round's configured
    messages as FitIns and captures the unmasked aggregate (it does not aggregate)."""

    def __init__(self, fitins: dict[int, FitIns], grid: Grid) -> None:
        self.fitins = fitins
        self.grid = grid
        self.results: list[tuple[Any, FitRes]] = []
        self.failures: list[Any] = []
        self.aggregated = False

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return [(GridClientProxy(nid, self.grid, 0), ins) for nid, ins in self.fitins.items()]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:
        self.results, self.failures, self.aggregated = list(results), list(failures), True
        return None, {}

    # unused parts of the legacy interface
    def initialize_parameters(self, client_manager: Any) -> None:  # pragma: no cover
        return None

    def configure_evaluate(self, *args: Any) -> list:  # pragma: no cover
        return []

    def aggregate_evaluate(self, *args: Any) -> tuple:  # pragma: no cover
        return None, {}

    def evaluate(self, *args: Any) -> None:  # pragma: no cover
        return None


class CountingGrid:
    """Delegates to a Grid and counts the payload bytes both ways (the SecAgg+ cost)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.bytes_sent = 0
        self.bytes_received = 0
        self.replies: list[Message] = []

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.bytes_sent += sum(content_nbytes(m.content) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.bytes_received += sum(content_nbytes(r.content) for r in replies if r.has_content())
        self.replies += replies
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@dataclass
class SecureRound:
    """What the server learns from one SecAgg+ round."""

    replies: list[Message]  # per survivor: the *aggregate* arrays + its own metrics
    failures: list[str]
    bytes_sent: int
    bytes_received: int
    seconds: float
    aggregate: dict[str, np.ndarray] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def max_weight(cfg: SecAggConfig, fed: FederationConfig, batch_size: int) -> float:
    """The bound on a client's weight that SecAgg+ divides by before quantising (the
    update is scaled by weight / max_weight, so the error on the mean grows with it):
    the configured one, else 1 under uniform weights (central DP), else the most
    examples a client can report in a round (``local_steps`` x batch size), else
    Flower's default 1000."""
    if cfg.max_weight is not None:
        return cfg.max_weight
    if fed.privacy.mode == "central":
        return 1.0
    if fed.local_steps:
        return float(fed.local_steps * batch_size)
    return 1000.0


def quantisation_error(cfg: SecAggConfig, weight_bound: float, weights: list[float]) -> float:
    """Worst-case error per entry of the aggregated mean update: one stochastic-rounding
    level (2 * clipping_range / quantization_range) per client, scaled back by
    max_weight / sum of weights."""
    level = 2 * cfg.clipping_range / cfg.quantization_range
    return len(weights) * level * weight_bound / sum(weights)


def secure_round(
    grid: Grid,
    messages: list[Message],
    current: dict[str, np.ndarray],
    cfg: SecAggConfig,
    server_round: int,
    timeout: float | None,
    uniform: bool,
    weight_bound: float = 1000.0,
) -> SecureRound:
    """Run SecAgg+ over the configured ``messages``; the survivors' replies carry the
    securely aggregated arrays (global + weighted mean update) and their own metrics."""
    t0 = time.perf_counter()
    names = list(current)
    by_node = {m.metadata.dst_node_id: m for m in messages}
    counting = CountingGrid(grid)
    adapter = _RoundStrategy(_fit_ins(by_node, names, uniform), counting)  # type: ignore[arg-type]
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
        strategy=adapter,
        client_manager=SimpleClientManager(),
    )
    workflow = SecAggPlusWorkflow(
        num_shares=_int_or_share(cfg.num_shares),
        reconstruction_threshold=_int_or_share(cfg.reconstruction_threshold),
        max_weight=weight_bound,
        clipping_range=cfg.clipping_range,
        quantization_range=cfg.quantization_range,
        modulus_range=cfg.modulus_range,
        timeout=timeout,
    )
    workflow(counting, context)  # type: ignore[arg-type]
    failures = [str(r.error.reason) for r in counting.replies if r.has_error()]
    failures = list(dict.fromkeys(failures))  # a dropout errors once per stage it misses
    out = SecureRound([], failures, counting.bytes_sent, counting.bytes_received, 0.0)
    if not adapter.aggregated or not adapter.results:
        out.failures.append("secagg: too few clients left to unmask (below the threshold)")
        out.seconds = time.perf_counter() - t0
        return out
    mean_update = parameters_to_ndarrays(adapter.results[0][1].parameters)
    aggregate = {
        n: (current[n].astype(np.float64) + u).astype(np.float32)
        for n, u in zip(names, mean_update, strict=True)
    }
    out.aggregate = aggregate
    for proxy, fitres in adapter.results:
        metrics = {k: v for k, v in fitres.metrics.items() if isinstance(v, int | float)}
        content = RecordDict(
            {ARRAYS_KEY: to_record(aggregate), METRICS_KEY: MetricRecord(metrics)}  # type: ignore[arg-type]
        )
        out.replies.append(Message(content, reply_to=by_node[proxy.node_id]))
    out.seconds = time.perf_counter() - t0
    return out


def _fit_ins(by_node: dict[int, Message], names: list[str], uniform: bool) -> dict[int, Any]:
    """Each node's train message as the legacy ``FitIns`` the workflow hands out: the
    arrays in ``names`` order, and the names and the weighting in the config."""
    fitins = {}
    for nid, m in by_node.items():
        config = dict(m.content[CONFIG_KEY])
        config[ARRAY_NAMES_KEY] = "\n".join(names)
        config[UNIFORM_KEY] = int(uniform)
        record = m.content[ARRAYS_KEY]
        params = Parameters(tensors=[record[n].data for n in names], tensor_type="numpy.ndarray")
        fitins[nid] = FitIns(params, config)  # type: ignore[arg-type]
    return fitins


def _int_or_share(x: float) -> int | float:
    """Config floats ≥ 2 that are whole mean a count; below, a share (Flower's rule)."""
    return int(x) if x >= 2 and float(x).is_integer() else float(x)
