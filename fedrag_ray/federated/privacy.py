"""Differential privacy of the clients' updates, from Flower's parts; only the glue here.

- **Central DP** wraps the strategy in one of Flower's wrappers
  (``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``): each update is
  clipped to the clipping norm (on the server, or by ``fixedclipping_mod`` /
  ``adaptiveclipping_mod`` on the client) and Gaussian noise of std
  ``z * C / clients`` is added to the average. Clients are averaged *uniformly*
  (``protocol.UNIFORM_WEIGHT_KEY``): the noise is calibrated to the sensitivity ``C / n`` of
  an unweighted mean, which example-count weights would break.
- **Local DP** is Flower's ``LocalDpMod`` on the client's train handler.
- **Accounting** is Flower's ``RdpAccountant`` (Rényi DP via Google's dp-accounting):
  client-level, add-or-remove-one neighbouring, **no amplification by sampling** —
  fedrag_ray's per-round client sample is seeded by the round from the config seed, so
  it is public and deterministic, and claiming subsampling amplification would be wrong.
  ε at the configured δ is recorded after every round and checkpointed (the ledger's
  event list), so a resumed run continues it exactly.
- ``target_epsilon`` instead of ``noise_multiplier``: the smallest multiplier (bisection
  on the same accountant) whose ``federation.rounds`` releases stay within the target.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from flwr.serverapp import GaussianPrivacyEvent
from flwr.serverapp import PrivacyConfig as FlowerPrivacyConfig
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_stdv
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

from fedrag_ray.config import FederationConfig, PrivacyConfig

ACCOUNTANT = "rdp (Flower RdpAccountant, dp-accounting)"
SAMPLING = (
    "no-amplification: the per-round sample is seeded by the round (public), so no "
    "privacy amplification by subsampling is claimed"
)
NEIGHBOURING = "add-or-remove-one client (client-level DP)"


def _rdp_accountant(cfg: FlowerPrivacyConfig) -> Any:
    from flwr.serverapp import RdpAccountant

    return RdpAccountant(cfg)


def _flower_config(delta: float, population: int) -> FlowerPrivacyConfig:
    return FlowerPrivacyConfig(
        target_delta=delta,
        population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )


def epsilon_after(noise_multiplier: float, releases: int, delta: float) -> float:
    """ε of ``releases`` Gaussian releases of multiplier z, no amplification, at δ."""
    acc = _rdp_accountant(_flower_config(delta, 1))
    acc.compose(GaussianPrivacyEvent(noise_multiplier, 1, 1), count=releases)
    return acc.get_epsilon(delta)


def noise_for_epsilon(target_epsilon: float, releases: int, delta: float) -> float:
    """The smallest z (to 1e-4 relative) whose ``releases`` releases spend ≤ target ε."""
    lo, hi = 1e-3, 1.0
    while epsilon_after(hi, releases, delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"target_epsilon {target_epsilon} is unreachable")
    while hi / lo > 1 + 1e-4:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if epsilon_after(mid, releases, delta) > target_epsilon else (lo, mid)
    return hi


def local_noise_multiplier(pcfg: PrivacyConfig) -> float:
    """LocalDpMod's std over its sensitivity (= the clipping norm): the classic Gaussian
    mechanism's sqrt(2 ln(1.25/δ)) / ε for one release."""
    return math.sqrt(2 * math.log(1.25 / pcfg.delta)) / pcfg.local_epsilon


class PrivacyLedger:
    """The privacy spent so far, one row per round, state for checkpoints."""

    def __init__(self, fed: FederationConfig, noise_multiplier: float | None = None) -> None:
        p = fed.privacy
        self.cfg = p
        self.mode = p.mode
        self.derived = False
        if p.mode == "central":
            if noise_multiplier is None:
                noise_multiplier = p.noise_multiplier
            if noise_multiplier is None:
                assert p.target_epsilon is not None
                noise_multiplier = noise_for_epsilon(p.target_epsilon, fed.rounds, p.delta)
                self.derived = True
            population = fed.num_clients
        else:
            noise_multiplier = local_noise_multiplier(p)
            population = 1  # one client's own releases
        self.noise_multiplier = float(noise_multiplier)
        self.population = population
        self.accountant = _rdp_accountant(_flower_config(p.delta, population))

    def compose_round(self, sample_size: int) -> None:
        """One released aggregate (adaptive clipping and local DP; Flower's fixed-clipping
        wrappers compose into :attr:`accountant` themselves)."""
        size = min(sample_size, self.population) if self.mode == "central" else 1
        self.accountant.compose(GaussianPrivacyEvent(self.noise_multiplier, size, self.population))

    def row(self) -> dict[str, Any]:
        spent = self.accountant.get_privacy_spent()
        return {
            "epsilon": float(spent.epsilon),
            "delta": float(spent.delta),
            "dp_releases": int(spent.num_releases),
        }

    def state(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "accountant": json.loads(json.dumps(self.accountant.state_dict())),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])

    def summary(self, fed: FederationConfig) -> dict[str, Any]:
        p = self.cfg
        out: dict[str, Any] = {
            "mode": p.mode,
            "unit": NEIGHBOURING,
            "accountant": ACCOUNTANT,
            "sampling": SAMPLING,
            "delta": p.delta,
            **self.row(),
        }
        if p.mode == "central":
            out |= {
                "clipping": ("adaptive " if p.adaptive else "fixed ") + p.clipping + "-side",
                "clipping_norm": p.clipping_norm,
                "noise_multiplier": self.noise_multiplier,
                "noise_multiplier_from_target_epsilon": p.target_epsilon if self.derived else None,
                "noise_std_on_mean": compute_stdv(
                    self.noise_multiplier, p.clipping_norm, fed.sampled
                ),
            }
        else:
            out |= {
                "mechanism": "Flower LocalDpMod (clip, Gaussian noise on every reply)",
                "local_epsilon_per_round": p.local_epsilon,
                "clipping_norm": p.clipping_norm,
                "sensitivity": p.clipping_norm,
                "noise_std_per_reply": p.clipping_norm * self.noise_multiplier,
                "composition": "a client in every round (worst case)",
            }
        return out


def wrap_strategy(
    strategy: Strategy, fed: FederationConfig, ledger: PrivacyLedger | None
) -> Strategy:
    """Wrap ``strategy`` in Flower's central-DP wrapper for ``fed.privacy`` (or not)."""
    p = fed.privacy
    if p.mode != "central":
        return strategy
    assert ledger is not None
    z, n = ledger.noise_multiplier, fed.sampled
    if not p.adaptive:
        cls = (
            DifferentialPrivacyServerSideFixedClipping
            if p.clipping == "server"
            else DifferentialPrivacyClientSideFixedClipping
        )
        return cls(strategy, z, p.clipping_norm, n, accountant=ledger.accountant)
    cls_a = (
        DifferentialPrivacyServerSideAdaptiveClipping
        if p.clipping == "server"
        else DifferentialPrivacyClientSideAdaptiveClipping
    )
    return cls_a(
        strategy,
        z,
        n,
        initial_clipping_norm=p.clipping_norm,
        target_clipped_quantile=p.target_clipped_quantile,
        clip_norm_lr=p.clip_norm_lr,
        clipped_count_stddev=p.clipped_count_stddev,
    )


def aggregate_train(strategy: Strategy, server_round: int, replies: list[Any]) -> Any:
    """``strategy.aggregate_train``, with the direction of Flower 1.41's adaptive clipping
    corrected.

    Flower's adaptive wrappers update ``C <- C * exp(-lr * (f - q))`` with ``f`` the noisy
    fraction of *clipped* updates and ``q`` the target clipped quantile, so when more
    updates than wanted are clipped the norm *shrinks* and clips even more (it diverges
    from the target; Andrew et al. use the fraction of *unclipped* updates in this rule).
    The wrapper exposes no hook, so the glue inverts the step Flower just took:
    ``C_new = C_old^2 / C_flower = C_old * exp(+lr * (f - q))``, which moves the clipped
    fraction towards ``q``. The noisy count and the noise are Flower's, untouched."""
    before = getattr(strategy, "clipping_norm", None)
    adaptive = isinstance(
        strategy,
        DifferentialPrivacyServerSideAdaptiveClipping
        | DifferentialPrivacyClientSideAdaptiveClipping,
    )
    result = strategy.aggregate_train(server_round, replies)
    after = getattr(strategy, "clipping_norm", None)
    if adaptive and before is not None and after is not None and after > 0:
        strategy.clipping_norm = before * before / after
    return result


def composes_itself(strategy: Strategy) -> bool:
    """Flower's fixed-clipping wrappers compose into their accountant on release."""
    return getattr(strategy, "accountant", None) is not None


@contextlib.contextmanager
def noise_rng(pcfg: PrivacyConfig, server_round: int) -> Iterator[None]:
    """Flower's wrappers draw their noise from NumPy's global RNG: for the block that
    aggregates, it is seeded from OS entropy, or from ``noise_seed`` and the round
    (reproducible runs and resumes; never for real deployments); the caller's global
    state is put back afterwards, so aggregating has no process-wide side effect."""
    state = np.random.get_state()
    if pcfg.noise_seed is None:
        np.random.seed()
    else:
        np.random.seed([pcfg.noise_seed, server_round])
    try:
        yield
    finally:
        np.random.set_state(state)


def train_mods(cfg_json: str) -> list[Any]:
    """Flower mods for the clients' train handler, outermost first: SecAgg+ (masks what
    leaves), then the bridge between SecAgg+'s legacy FitIns/FitRes records and the
    Message-API handler, then clipping / local noise (innermost, on the trained arrays)."""
    fed = json.loads(cfg_json).get("federation") or {}
    p = PrivacyConfig.model_validate(fed.get("privacy") or {})
    mods: list[Any] = []
    if p.secagg.enabled:
        from flwr.client.mod import secaggplus_mod

        from fedrag_ray.federated.secagg import secagg_bridge_mod

        mods += [secaggplus_mod, secagg_bridge_mod]
    if p.mode == "central" and p.clipping == "client":
        from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

        mods.append(adaptiveclipping_mod if p.adaptive else fixedclipping_mod)
    elif p.mode == "local":
        from flwr.clientapp.mod import LocalDpMod

        mods.append(LocalDpMod(p.clipping_norm, p.clipping_norm, p.local_epsilon, p.delta))
    return mods


def clipping_norm_of(strategy: Strategy) -> float | None:
    return getattr(strategy, "clipping_norm", None)


def noise_std_of(strategy: Strategy) -> float | None:
    """The std of the noise the wrapper adds to the mean this round."""
    z, c, n = (
        getattr(strategy, k, None)
        for k in ("noise_multiplier", "clipping_norm", "num_sampled_clients")
    )
    if z is None or c is None or n is None:
        return None
    return compute_stdv(z, c, n)
