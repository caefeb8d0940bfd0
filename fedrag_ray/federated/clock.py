"""The simulated clock: how long each client task would take in a real federation.

Real compute still runs on this machine; the clock is *computed*, never slept. A client
task's simulated seconds are

    training tokens / its tier's tokens/s + bytes down / downlink + bytes up / uplink

with bandwidths in Mbit/s (x 1e6 / 8 bytes). Tiers (``federation.clients.profiles``) are
assigned to clients by exact counts (largest remainder of share x clients) in a
permutation seeded by the run's seed; a ``daily`` tier's clients each get a seeded
offset in hours (a time zone); a ``probability`` tier's clients are drawn per round.
Everything is an array indexed by partition id, built once, so a round costs a few
NumPy operations over its clients whatever the federation's size (the engine benchmark
runs 10^5 clients). Without profiles there is one implicit tier, infinitely fast: every
duration is 0 and every client always available, as before this module existed.

:func:`round_cut` applies the synchronous round policies to a round's durations;
:func:`buffered_update` is FedBuff's staleness-weighted server step (``async_loop``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedrag_ray.config import FederationConfig, RoundPolicyConfig

# Streams of the run's seed, so that tiers, offsets and draws never share a generator
# with the client sampler ([seed, round]) or each other.
TIER_STREAM = 2901
OFFSET_STREAM = 2902
AVAILABILITY_STREAM = 2903
DEFAULT_TIER = "default"  # the implicit tier of a run without profiles
SECONDS_PER_HOUR = 3600.0


def largest_remainder(shares: Sequence[float], n: int) -> np.ndarray:
    """Exact counts per share summing to ``n``: floors, then one more for the largest
    remainders (ties: the earlier tier)."""
    quotas = np.asarray(shares, dtype=np.float64) * n
    counts = np.floor(quotas).astype(np.int64)
    rest = n - int(counts.sum())
    order = np.lexsort((np.arange(len(quotas)), -(quotas - counts)))
    counts[order[:rest]] += 1
    return counts


def assign_tiers(shares: Sequence[float], n: int, seed: int) -> np.ndarray:
    """Tier index per client (partition id): exact counts, seeded permutation."""
    tiers = np.repeat(np.arange(len(shares)), largest_remainder(shares, n))
    return np.random.default_rng([seed, TIER_STREAM]).permutation(tiers)


def _mbps_to_bytes_per_s(mbps: float | None) -> float:
    return math.inf if mbps is None else mbps * 1e6 / 8


@dataclass
class SimClock:
    """Per-tier figures and each client's tier, as arrays; see the module docstring."""

    names: list[str]
    tokens_per_s: np.ndarray  # per tier; inf: compute takes no simulated time
    down_bytes_per_s: np.ndarray
    up_bytes_per_s: np.ndarray
    local_steps: np.ndarray  # per tier; 0: the federation's local_steps / epochs
    availability: list[Any]  # per tier: AvailabilityConfig
    tier_of: np.ndarray  # per client
    offset_h: np.ndarray  # per client: its day's offset in hours (daily tiers)
    seed: int = 0

    @classmethod
    def from_config(cls, fed: FederationConfig, seed: int) -> SimClock:
        """The clock of ``fed`` (one implicit, infinitely fast tier without profiles)."""
        from fedrag_ray.config import AvailabilityConfig

        profiles = fed.clients.profiles
        n = fed.num_clients
        if not profiles:
            return cls(
                [DEFAULT_TIER],
                np.array([math.inf]),
                np.array([math.inf]),
                np.array([math.inf]),
                np.zeros(1, dtype=np.int64),
                [AvailabilityConfig()],
                np.zeros(n, dtype=np.int64),
                np.zeros(n),
                seed,
            )
        ref = fed.clients.reference_tokens_per_s
        return cls(
            [p.name for p in profiles],
            np.array([p.tokens_per_s or (p.speed or 1.0) * ref for p in profiles]),
            np.array([_mbps_to_bytes_per_s(p.downlink_mbps) for p in profiles]),
            np.array([_mbps_to_bytes_per_s(p.uplink_mbps) for p in profiles]),
            np.array([p.local_steps or 0 for p in profiles], dtype=np.int64),
            [p.availability for p in profiles],
            assign_tiers([p.share for p in profiles], n, seed),
            np.random.default_rng([seed, OFFSET_STREAM]).uniform(0.0, 24.0, n),
            seed,
        )

    @property
    def heterogeneous(self) -> bool:
        return self.names != [DEFAULT_TIER]

    def durations(
        self,
        pids: np.ndarray,
        tokens: np.ndarray,
        bytes_down: np.ndarray,
        bytes_up: np.ndarray,
    ) -> np.ndarray:
        """Simulated seconds of the tasks of clients ``pids`` (vectorised)."""
        t = self.tier_of[np.asarray(pids, dtype=np.int64)]
        with np.errstate(divide="ignore"):
            return (
                np.asarray(tokens, dtype=np.float64) / self.tokens_per_s[t]
                + np.asarray(bytes_down, dtype=np.float64) / self.down_bytes_per_s[t]
                + np.asarray(bytes_up, dtype=np.float64) / self.up_bytes_per_s[t]
            )

    def client_local_steps(self) -> np.ndarray | None:
        """Local steps per client (0: the federation's), or None when no tier sets any."""
        if not self.local_steps.any():
            return None
        return self.local_steps[self.tier_of]

    def available(self, sim_time: float, draw: int, attempt: int = 0) -> np.ndarray | None:
        """Which clients can be sampled at simulated second ``sim_time`` (daily tiers)
        and in draw ``draw`` (probability tiers: the round, seeded; ``attempt`` redraws
        when an asynchronous server found no one); None: every client."""
        kinds = [a.type for a in self.availability]
        if all(k == "always" for k in kinds):
            return None
        mask = np.ones(len(self.tier_of), dtype=bool)
        if "daily" in kinds:
            hour = (sim_time / SECONDS_PER_HOUR + self.offset_h) % 24.0
            for i, a in enumerate(self.availability):
                if a.type == "daily":
                    start, end = a.on_hours
                    if start < end:
                        on = (hour >= start) & (hour < end)
                    else:  # wraps midnight
                        on = (hour >= start) | (hour < end)
                    mask &= on | (self.tier_of != i)
        if "probability" in kinds:
            u = np.random.default_rng([self.seed, AVAILABILITY_STREAM, draw, attempt]).random(
                len(self.tier_of)
            )
            p = np.array([a.p if a.type == "probability" else 1.0 for a in self.availability])
            mask &= u < p[self.tier_of]
        return mask

    def assignment(self) -> dict[str, Any]:
        """What ``results.json`` records: each client's tier (and day offset, if any tier
        is daily); without profiles only the implicit tier's name."""
        if not self.heterogeneous:
            return {"tiers": self.names}
        out: dict[str, Any] = {"tiers": self.names, "client_tiers": self.tier_of.tolist()}
        if any(a.type == "daily" for a in self.availability):
            out["client_offset_hours"] = np.round(self.offset_h, 4).tolist()
        return out


def round_cut(
    policy: RoundPolicyConfig, pids: np.ndarray, durations: np.ndarray, k: int
) -> tuple[np.ndarray, float]:
    """(kept mask, the round's simulated seconds) for a synchronous round's clients:
    ``sync`` keeps all and lasts the slowest; ``deadline`` drops those over
    ``deadline_s`` and lasts min(deadline, slowest); ``over_selection`` keeps the first
    ``k`` to finish (ties: lower partition id) and lasts until the k-th."""
    d = np.asarray(durations, dtype=np.float64)
    if d.size == 0:
        return np.zeros(0, dtype=bool), 0.0
    if policy.type == "deadline":
        assert policy.deadline_s is not None
        return d <= policy.deadline_s, float(min(policy.deadline_s, d.max()))
    if policy.type == "over_selection":
        order = np.lexsort((np.asarray(pids), d))[:k]
        kept = np.zeros(d.size, dtype=bool)
        kept[order] = True
        return kept, float(d[order].max())
    return np.ones(d.size, dtype=bool), float(d.max())


def staleness_weights(
    num_examples: Sequence[float], staleness: Sequence[int], exponent: float
) -> np.ndarray:
    """FedBuff's weights: num_examples x (1 + staleness)^-exponent."""
    n = np.asarray(num_examples, dtype=np.float64)
    return n * (1.0 + np.asarray(staleness, dtype=np.float64)) ** -exponent


def buffered_update(
    current: dict[str, np.ndarray],
    trained: Sequence[dict[str, np.ndarray]],
    received: Sequence[dict[str, np.ndarray]],
    staleness: Sequence[int],
    weights: Sequence[float],
    server_lr: float,
) -> dict[str, np.ndarray]:
    """``current + server_lr * sum(w_i delta_i) / sum(w_i)``, delta_i = trained_i -
    received_i, computed as ``current + server_lr * (mean_w(y) - current)`` with
    ``y_i = current + delta_i`` (``y_i = trained_i`` when not stale, no arithmetic), and
    the weighted mean in Flower's FedAvg arithmetic (factors w_i / sum w, accumulated in
    the given order). The same sum, and with fresh arrivals and ``server_lr`` 1 it is
    bit for bit Flower's FedAvg of the same replies in the same order."""
    total = float(sum(float(w) for w in weights))
    factors = [float(w) / total for w in weights]
    mean: dict[str, np.ndarray] = {}
    for arrays, base, tau, f in zip(trained, received, staleness, factors, strict=True):
        for key, value in arrays.items():
            y = value if tau == 0 else current[key] + (value - base[key])
            if key not in mean:
                mean[key] = y * f
            else:
                mean[key] += y * f
    if server_lr == 1.0:
        return {k: np.asarray(v, dtype=current[k].dtype) for k, v in mean.items()}
    return {
        k: np.asarray(current[k] + server_lr * (mean[k] - current[k]), dtype=current[k].dtype)
        for k in mean
    }


def tier_report(
    clock: SimClock, history: Sequence[dict[str, Any]], sizes: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Per tier: its clients, the tasks sent to them, the tasks whose update reached the
    model, and the share of the tier's training examples that reached it: the examples
    of clients with at least one update aggregated (``sizes``: examples per client).
    Read from the run's rows, so a resumed run reports the same as an uninterrupted one."""
    n_tiers = len(clock.names)
    reached = np.zeros(len(clock.tier_of), dtype=bool)
    sent, arrived = np.zeros(n_tiers, dtype=np.int64), np.zeros(n_tiers, dtype=np.int64)
    for row in history:
        sent += [row.get("tier_sent", {}).get(name, 0) for name in clock.names]
        arrived += [row.get("tier_reached", {}).get(name, 0) for name in clock.names]
        if row.get("aggregated"):
            pids = [c["partition-id"] for c in row.get("clients", []) if not c.get("dropped")]
            reached[np.asarray(pids, dtype=np.int64)] = True
    clients = np.bincount(clock.tier_of, minlength=n_tiers)
    examples = np.bincount(clock.tier_of, weights=sizes, minlength=n_tiers)
    examples_reached = np.bincount(clock.tier_of, weights=sizes * reached, minlength=n_tiers)
    return {
        name: {
            "clients": int(clients[i]),
            "tasks_sent": int(sent[i]),
            "tasks_reached_model": int(arrived[i]),
            "examples": int(examples[i]),
            "examples_reached_share": float(examples_reached[i] / examples[i])
            if examples[i]
            else 0.0,
        }
        for i, name in enumerate(clock.names)
    }
