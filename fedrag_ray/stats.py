"""Uncertainty for every quality claim: bootstrap intervals over questions, paired
differences, and the spread over training seeds.

One module so the CLI summary, ``results.json`` and the benchmarks compute intervals the
same way. Intervals are percentile bootstrap intervals over the evaluated questions
(Efron & Tibshirani 1993, ch. 13); a comparison of two systems on the *same* questions
resamples the per-question differences (a paired bootstrap), which is far tighter than
comparing two independent intervals because most questions are easy or hard for both.
A difference counts as a win only when its interval excludes 0.

Everything is seeded: the same scores give the same interval on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_SAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 0
# Per-question keys carry a prefix in flat metric records (Flower's MetricRecord, the
# round log) so they are never mistaken for a scalar metric.
PER_QUESTION_PREFIX = "per_question/"
INTERVAL_SUFFIXES = ("_lo", "_hi")


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval; ``n`` questions (or seeds)."""

    mean: float
    lo: float
    hi: float
    n: int
    confidence: float = DEFAULT_CONFIDENCE

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0.0 or self.hi < 0.0

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2.0

    def to_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "excludes_zero": self.excludes_zero}

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def _values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    arr = arr[~np.isnan(arr)]
    return arr


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    samples: int = DEFAULT_SAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> Interval:
    """Mean of ``values`` with its percentile bootstrap interval (NaNs dropped: e.g.
    recall of questions without a gold passage).

    Quantiles use the inverted empirical CDF, so the interval's ends are attainable
    bootstrap means (on tiny samples the interval matches a hand enumeration)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    arr = _values(values)
    if arr.size == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, 0, confidence)
    rng = np.random.default_rng(seed)
    means = np.empty(samples, dtype=np.float64)
    # Chunked so 10^4 questions x 10^4 samples never materialise one 10^8 index array.
    chunk = max(1, 2_000_000 // arr.size)
    for start in range(0, samples, chunk):
        stop = min(samples, start + chunk)
        idx = rng.integers(0, arr.size, size=(stop - start, arr.size))
        means[start:stop] = arr[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha], method="inverted_cdf")
    return Interval(float(arr.mean()), float(lo), float(hi), int(arr.size), confidence)


def paired_difference(
    after: Sequence[float] | np.ndarray,
    before: Sequence[float] | np.ndarray,
    samples: int = DEFAULT_SAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> Interval:
    """mean(after - before) over the same questions, with its paired bootstrap interval.
    Pairs where either side is NaN are dropped."""
    a = np.asarray(after, dtype=np.float64).ravel()
    b = np.asarray(before, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(
            f"paired difference needs the same questions on both sides ({a.size} vs {b.size})"
        )
    diff = a - b
    return bootstrap_ci(diff, samples, confidence, seed)


def seed_spread(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """Mean over training seeds with a Student-t interval (few seeds: a bootstrap over 3
    values would be meaningless). One seed gives a zero-width interval, marked by n=1."""
    arr = _values(values)
    if arr.size == 0:
        nan = float("nan")
        return Interval(nan, nan, nan, 0, confidence)
    mean = float(arr.mean())
    if arr.size == 1:
        return Interval(mean, mean, mean, 1, confidence)
    from scipy import stats as scipy_stats

    sem = float(arr.std(ddof=1)) / math.sqrt(arr.size)
    t = float(scipy_stats.t.ppf(0.5 + confidence / 2.0, df=arr.size - 1))
    return Interval(mean, mean - t * sem, mean + t * sem, int(arr.size), confidence)


def with_intervals(
    metrics: Mapping[str, float],
    per_question: Mapping[str, Sequence[float]],
    samples: int = DEFAULT_SAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> dict[str, float]:
    """``metrics`` plus ``<name>_lo`` / ``<name>_hi`` for every metric with per-question
    scores (flat floats: they travel in Flower records and round logs as they are)."""
    out = dict(metrics)
    for name, values in per_question.items():
        ci = bootstrap_ci(values, samples, confidence, seed)
        out[f"{name}_lo"], out[f"{name}_hi"] = ci.lo, ci.hi
    return out


def paired_gains(
    after: Mapping[str, Sequence[float]],
    before: Mapping[str, Sequence[float]],
    samples: int = DEFAULT_SAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = DEFAULT_SEED,
) -> dict[str, dict[str, float | int | bool]]:
    """Paired after-minus-before difference of every metric both evaluations scored per
    question (same questions, same order), as JSON-ready dicts."""
    out = {}
    for name in after:
        if name in before and len(after[name]) == len(before[name]):
            out[name] = paired_difference(
                after[name], before[name], samples, confidence, seed
            ).to_dict()
    return out


def split_per_question(record: Mapping[str, object]) -> tuple[dict[str, float], dict[str, list]]:
    """A flat record (scalars + ``per_question/<name>`` lists) → (scalars, per-question)."""
    scalars: dict[str, float] = {}
    per_q: dict[str, list] = {}
    for k, v in record.items():
        if k.startswith(PER_QUESTION_PREFIX):
            per_q[k[len(PER_QUESTION_PREFIX) :]] = [float(x) for x in v]  # type: ignore[union-attr]
        else:
            scalars[k] = float(v)  # type: ignore[arg-type]
    return scalars, per_q


def join_per_question(
    scalars: Mapping[str, float], per_question: Mapping[str, Sequence[float]]
) -> dict[str, float | list[float]]:
    """The inverse of :func:`split_per_question`."""
    out: dict[str, float | list[float]] = dict(scalars)
    for k, v in per_question.items():
        out[PER_QUESTION_PREFIX + k] = [float(x) for x in v]
    return out
