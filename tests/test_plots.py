"""Plots read at a glance: integer rounds, honest axes, the before value as a reference.

Read back from the matplotlib figures themselves (tick positions, y-limits, lines), on
history rows shaped like a federated run's (round 0 = before training).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrag_ray import plots


def _history(rounds: int = 3, interval: bool = True) -> list[dict]:
    rows = [{"round": 0, "recall@5": 1.0, "exact_match": 0.10, "seconds": 4.0}]
    for r in range(1, rounds + 1):
        row = {
            "round": r,
            "train_loss": 1.5 / r,
            "recall@5": 1.0,
            "exact_match": 0.10 + 0.05 * r,
            "seconds": 30.0 + r,
            "peak_rss_gib": 3.2 + 0.1 * r,
            "mib_per_round": 30.6,
        }
        rows.append(row)
    if interval:
        for row in rows:
            row["exact_match_lo"] = row["exact_match"] - 0.02
            row["exact_match_hi"] = row["exact_match"] + 0.02
    return rows


def test_round_ticks_are_the_integer_rounds() -> None:
    fig = plots.metrics_figure(_history(3), ["recall@5", "exact_match"], "t")
    for ax in fig.axes:
        assert list(ax.get_xticks()) == [0, 1, 2, 3]
    long = [{"round": r, "train_loss": 1.0} for r in range(1, 41)]
    ax = plots.metrics_figure(long, ["train_loss"], "t").axes[0]
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 40]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_rates_sit_on_a_zero_to_one_axis() -> None:
    """A flat recall of 1.00 must not be auto-zoomed to 0.96-1.04."""
    fig = plots.metrics_figure(_history(3), ["recall@5", "exact_match"], "t")
    for ax in fig.axes:
        assert ax.get_ylim() == (0.0, 1.0)
    assert plots.is_rate("closed_book_exact_match") and plots.is_rate("rouge_l")
    assert not plots.is_rate("train_loss") and not plots.is_rate("peak_rss_gib")


def test_memory_bytes_and_loss_start_at_zero() -> None:
    rows = [r for r in _history(3) if r["round"] > 0]
    fig = plots.metrics_figure(rows, ["peak_rss_gib", "mib_per_round", "train_loss"], "t")
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert lo == 0.0
        assert hi >= max(max(line.get_ydata()) for line in ax.get_lines())


def test_before_training_is_a_reference_line_and_the_interval_is_drawn() -> None:
    fig = plots.metrics_figure(_history(3), ["exact_match"], "t")
    ax = fig.axes[0]
    flat = [
        ln for ln in ax.get_lines() if len(set(ln.get_ydata())) == 1 and ln.get_linestyle() == "--"
    ]
    assert [ln.get_ydata()[0] for ln in flat] == [pytest.approx(0.10)]
    assert ax.collections, "the 95% interval band"
    # no interval keys, no band
    assert (
        not plots.metrics_figure(_history(3, interval=False), ["exact_match"], "t")
        .axes[0]
        .collections
    )


def test_story_has_loss_and_main_metric(tmp_path: Path) -> None:
    rows = _history(4)
    assert plots.main_metric(rows) == "exact_match"
    fig = plots.story_figure(rows, title="demo")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["training loss", "exact_match"]
    assert "0.100 (round 0) → 0.300 (round 4)" in fig._suptitle.get_text()
    out = tmp_path / "story.png"
    plots.run_story(rows, out, title="demo")
    assert out.read_bytes()[:4] == b"\x89PNG"
    plots.run_story([{"round": 0, "seconds": 1.0}], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
