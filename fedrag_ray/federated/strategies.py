"""Flower strategies from config, and their state for checkpoints.

The strategies are Flower's own (``flwr.serverapp.strategy``), the robust ones
(FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) included: fedrag_ray only chooses
one and its parameters; which clients a round trains is decided by
``sampling.ClientSampler``, which hands the strategy only those nodes. Differential
privacy wraps the strategy (``privacy.wrap_strategy``), it is not a subclass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedrag_ray.config import StrategyConfig
from fedrag_ray.federated.protocol import WEIGHT_KEY

# Attributes of Flower's strategies that change while training (FedOpt's moments,
# FedAvgM's momentum and the arrays of the current round); everything else is set from
# config at construction.
_STATE_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")


def build_strategy(cfg: StrategyConfig, weighted_by_key: str = WEIGHT_KEY) -> Strategy:
    """``weighted_by_key``: the reply metric to weight clients by (DP averages uniformly,
    see ``protocol.UNIFORM_WEIGHT_KEY``)."""
    common: dict[str, Any] = {
        "fraction_train": 1.0,  # of the nodes sampling.ClientSampler hands it
        "fraction_evaluate": 0.0,  # evaluation is server-side on held-out questions
        "min_train_nodes": 1,
        "min_available_nodes": 1,
        "weighted_by_key": weighted_by_key,
    }
    if cfg.name == "fedavg":
        return FedAvg(**common)
    if cfg.name == "fedavgm":
        return FedAvgM(
            **common,
            server_learning_rate=cfg.server_lr,
            server_momentum=cfg.server_momentum,
        )
    if cfg.name == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if cfg.name == "fedmedian":
        return FedMedian(**common)
    if cfg.name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.trim_beta)
    if cfg.name == "krum":
        return Krum(**common, num_malicious_nodes=cfg.num_malicious_nodes)
    if cfg.name == "multikrum":
        return MultiKrum(
            **common,
            num_malicious_nodes=cfg.num_malicious_nodes,
            num_nodes_to_select=cfg.num_nodes_to_select,
        )
    if cfg.name == "bulyan":
        return Bulyan(**common, num_malicious_nodes=cfg.num_malicious_nodes)
    opt = {"eta": cfg.eta, "eta_l": cfg.eta_l, "beta_1": cfg.beta_1, "tau": cfg.tau}
    if cfg.name == "fedadagrad":
        return FedAdagrad(**common, eta=cfg.eta, eta_l=cfg.eta_l, tau=cfg.tau)
    if cfg.name == "fedadam":
        return FedAdam(**common, **opt, beta_2=cfg.beta_2)
    if cfg.name == "fedyogi":
        return FedYogi(**common, **opt, beta_2=cfg.beta_2)
    raise ValueError(f"unknown strategy {cfg.name!r}")


def base_strategy(strategy: Strategy) -> Strategy:
    """The Flower strategy inside any wrappers (DP wrappers keep it as ``.strategy``)."""
    while isinstance(getattr(strategy, "strategy", None), Strategy):
        strategy = strategy.strategy
    return strategy


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The training state as ``{attribute: {name: ndarray} | None}``, what a checkpoint
    stores: FedOpt keeps it so already; FedAvgM keeps an ``ArrayRecord`` and a list."""
    strategy = base_strategy(strategy)
    return {k: _named(getattr(strategy, k)) for k in _STATE_ATTRS if hasattr(strategy, k)}


def _named(value: Any) -> dict[str, np.ndarray] | None:
    if value is None:
        return None
    if isinstance(value, ArrayRecord):
        return {n: a.numpy() for n, a in value.items()}
    if isinstance(value, list):  # FedAvgM's momentum, in the order of its arrays
        return {str(i): np.asarray(a) for i, a in enumerate(value)}
    return {n: np.asarray(a) for n, a in value.items()}


def load_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    strategy = base_strategy(strategy)
    for k, v in state.items():
        if k not in _STATE_ATTRS:
            raise ValueError(f"unexpected strategy state {k!r}")
        named = None if v is None else {n: np.asarray(a) for n, a in v.items()}
        if named is not None and isinstance(strategy, FedAvgM):
            if k == "current_arrays":
                setattr(strategy, k, ArrayRecord({n: Array(a) for n, a in named.items()}))
                continue
            if k == "momentum_vector":
                setattr(strategy, k, [named[str(i)] for i in range(len(named))])
                continue
        setattr(strategy, k, named)
