"""Bootstrap intervals and paired differences against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedrag_ray.evaluate import best_over_answers, exact_match, normalize_answer, token_f1
from fedrag_ray.stats import (
    bootstrap_ci,
    join_per_question,
    paired_difference,
    paired_gains,
    seed_spread,
    split_per_question,
    with_intervals,
)


def test_bootstrap_matches_the_exact_enumeration_of_a_tiny_sample():
    # Scores [0, 0, 1]: a resample holds Binomial(3, 1/3) ones, so its mean is 0, 1/3,
    # 2/3, 1 with probability 8/27, 12/27, 6/27, 1/27 (cumulative .296, .741, .963, 1).
    # 95%: the 2.5% quantile is 0 and the 97.5% quantile is 1 (.963 < .975).
    # 90%: the 95% quantile is 2/3 (.963 >= .95).
    ci = bootstrap_ci([0, 0, 1], samples=20000, confidence=0.95, seed=1)
    assert ci.mean == pytest.approx(1 / 3)
    assert (ci.lo, ci.hi) == (0.0, 1.0)
    ci90 = bootstrap_ci([0, 0, 1], samples=20000, confidence=0.90, seed=1)
    assert (ci90.lo, ci90.hi) == (0.0, pytest.approx(2 / 3))
    assert ci.n == 3 and not ci.excludes_zero


def test_bootstrap_width_follows_the_standard_error_on_a_large_sample():
    # 1,000 questions at EM 0.3: the normal approximation's half-width is
    # 1.96 * sqrt(.3 * .7 / 1000) = 0.0284 -- the "about +-3 points".
    values = np.array([1.0] * 300 + [0.0] * 700)
    ci = bootstrap_ci(values, samples=4000, seed=0)
    assert ci.half_width == pytest.approx(1.96 * math.sqrt(0.3 * 0.7 / 1000), rel=0.1)
    assert ci.lo < 0.3 < ci.hi
    # seeded: the same interval every time; NaNs (questions without gold) are dropped
    assert bootstrap_ci(values, samples=4000, seed=0) == ci
    with_nan = bootstrap_ci(np.append(values, np.nan), samples=4000, seed=0)
    assert with_nan == ci


def test_paired_difference_by_hand():
    before = [0, 0, 1, 1, 0, 1]
    # the same shift on every question: the interval collapses onto it
    shifted = paired_difference([b + 0.5 for b in before], before, samples=500)
    assert (shifted.mean, shifted.lo, shifted.hi) == (0.5, 0.5, 0.5)
    assert shifted.excludes_zero
    # differences [1, 0]: resample means 0, 0.5, 1 with p 1/4, 1/2, 1/4 -> 95% CI [0, 1]
    d = paired_difference([1, 1], [0, 1], samples=20000, seed=3)
    assert (d.mean, d.lo, d.hi) == (0.5, 0.0, 1.0) and not d.excludes_zero
    with pytest.raises(ValueError, match="same questions"):
        paired_difference([1, 0], [1])


def test_paired_is_tighter_than_two_independent_intervals():
    rng = np.random.default_rng(0)
    hard = rng.random(1000) < 0.4  # questions both systems find easy or hard
    before = (hard & (rng.random(1000) < 0.9)).astype(float)
    after = np.maximum(before, (rng.random(1000) < 0.05)).astype(float)
    d = paired_difference(after, before, samples=2000)
    a, b = bootstrap_ci(after, samples=2000), bootstrap_ci(before, samples=2000)
    assert d.excludes_zero
    assert a.lo < b.hi  # the separate intervals overlap ...
    assert d.half_width < a.half_width  # ... the paired one is narrower


def test_seed_spread_is_a_t_interval():
    ci = seed_spread([0.20, 0.24, 0.22])
    # mean .22, sd .02, t(0.975, 2) = 4.3027: half-width 4.3027 * .02 / sqrt(3) = .0497
    assert ci.mean == pytest.approx(0.22)
    assert ci.half_width == pytest.approx(4.3027 * 0.02 / math.sqrt(3), rel=1e-3)
    one = seed_spread([0.3])
    assert (one.lo, one.hi, one.n) == (0.3, 0.3, 1)


def test_flat_records_round_trip_and_gains():
    per_q = {"exact_match": [1.0, 0.0, 1.0, 1.0], "recall@1": [1.0, float("nan"), 0.0, 1.0]}
    metrics = with_intervals({"exact_match": 0.75}, per_q, samples=500)
    assert metrics["exact_match_lo"] <= 0.75 <= metrics["exact_match_hi"]
    assert "recall@1_lo" in metrics
    scalars, back = split_per_question(join_per_question(metrics, per_q))
    assert scalars == metrics and back["exact_match"] == per_q["exact_match"]
    gains = paired_gains(per_q, {"exact_match": [0.0] * 4}, samples=500)
    assert set(gains) == {"exact_match"} and gains["exact_match"]["mean"] == 0.75


@pytest.mark.parametrize(
    ("prediction", "answers", "em", "f1"),
    [
        # normalisation: case, punctuation, articles, white space
        ("The  Eiffel Tower!", ["eiffel tower"], 1.0, 1.0),
        # the best over gold answers
        ("in 1900", ["1900", "in 1900"], 1.0, 1.0),
        # token F1 by hand: pred {denver, broncos, won}, gold {denver, broncos}:
        # p = 2/3, r = 1, F1 = 2 * (2/3) / (5/3) = 0.8
        ("Denver Broncos won", ["Denver Broncos"], 0.0, 0.8),
        # max over answers of F1: vs "Broncos" p = 1/2, r = 1 -> 2/3; vs "Carolina" 0
        ("Denver Broncos", ["Carolina", "Broncos"], 0.0, 2 / 3),
        ("", ["x"], 0.0, 0.0),
    ],
)
def test_squad_em_and_f1_by_hand(prediction, answers, em, f1):
    assert best_over_answers(exact_match, prediction, answers) == em
    assert best_over_answers(token_f1, prediction, answers) == pytest.approx(f1)


def test_normalisation_is_squads():
    assert normalize_answer("A cat, an apple & THE dog.") == "cat apple dog"
