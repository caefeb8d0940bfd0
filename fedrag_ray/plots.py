"""PNG plots for results directories (matplotlib, headless), drawn to be read at a glance.

Rules every per-round panel follows: rounds are integers on the x axis; a rate (recall,
accuracy, exact match, F1, MRR, ROUGE: anything in [0, 1]) sits on a 0-1 axis, and every
other non-negative quantity (loss, seconds, memory, bytes, epsilon) starts at 0, so a flat
line looks flat instead of auto-zoomed into a climb; the before-training value (round 0)
is a dashed reference line; a 95% interval is drawn where a row carries ``<key>_lo`` /
``<key>_hi``. ``run_story`` puts the run's training loss and its main metric side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

RATE_MARKERS = ("recall", "accuracy", "exact_match", "f1", "mrr", "rouge", "overlap", "precision")
MAIN_METRICS = ("exact_match", "accuracy", "f1", "recall@5", "recall@1", "mrr")
LABELS = {
    "train_loss": "training loss",
    "seconds": "round time (s)",
    "mib_per_round": "MiB moved per round",
    "peak_rss_gib": "peak memory (GiB)",
    "epsilon": "privacy ε spent",
}
MAX_LABELLED_ROUNDS = 15


def is_rate(key: str) -> bool:
    """Metrics bounded by [0, 1] by definition (not merely by the values seen)."""
    k = key.lower()
    return k != "train_loss" and any(m in k for m in RATE_MARKERS)


def label(key: str) -> str:
    return LABELS.get(key, key)


def _round_ticks(ax: Axes, rounds: list[int]) -> None:
    """Integer rounds only: every round labelled for short runs, integer steps for long."""
    distinct = sorted(set(rounds))
    if distinct and len(distinct) <= MAX_LABELLED_ROUNDS:
        ax.set_xticks(distinct)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def _y_range(ax: Axes, key: str, values: list[float]) -> None:
    if is_rate(key):
        ax.set_ylim(0.0, 1.0)
    elif values and min(values) >= 0:
        top = max(values)
        ax.set_ylim(0.0, top * 1.1 if top > 0 else 1.0)


def _interval(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float, float]]:
    lo, hi = f"{key}_lo", f"{key}_hi"
    return [
        (r["round"], r[lo], r[hi])
        for r in rows
        if r.get(lo) is not None and r.get(hi) is not None and r.get(key) is not None
    ]


def _panel(ax: Axes, rows: list[dict[str, Any]], key: str) -> None:
    """One metric over rounds, with its interval and the round-0 reference."""
    pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    rounds = [p[0] for p in pts]
    values = [p[1] for p in pts]
    band = _interval(rows, key)
    if band:
        ax.fill_between(
            [b[0] for b in band],
            [b[1] for b in band],
            [b[2] for b in band],
            alpha=0.2,
            color="C0",
            lw=0,
            label="95% interval",
        )
    ax.plot(rounds, values, marker="o", color="C0", clip_on=False, zorder=3)
    before = next((r for r in rows if r["round"] == 0 and r.get(key) is not None), None)
    if before is not None:
        ax.axhline(before[key], ls="--", lw=1, color="0.4", label="before training")
    _round_ticks(ax, [r["round"] for r in rows])  # the same rounds on every panel
    _y_range(ax, key, values + [b[2] for b in band])
    ax.set_title(label(key))
    ax.grid(alpha=0.3)
    if band or before is not None:
        ax.legend(fontsize=7, loc="best")


def metrics_figure(rows: list[dict[str, Any]], keys: list[str], title: str) -> Figure | None:
    """One panel per metric key present in ``rows``, x = round; None if none is present."""
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        _panel(ax, rows, key)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def metrics_vs_round(rows: list[dict], keys: list[str], path: str | Path, title: str) -> None:
    """One panel per metric key, x = round (written only if a key is present)."""
    fig = metrics_figure(rows, keys, title)
    if fig is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)


def main_metric(rows: list[dict[str, Any]]) -> str | None:
    """The metric a run is judged by: the first of ``MAIN_METRICS`` its rows carry."""
    return next((m for m in MAIN_METRICS if any(r.get(m) is not None for r in rows)), None)


def story_figure(
    rows: list[dict[str, Any]], metric: str | None = None, title: str = "run"
) -> Figure | None:
    """Training loss and the main metric per round, side by side, with the before value."""
    metric = metric or main_metric(rows)
    keys = [k for k in ("train_loss", metric) if k and any(r.get(k) is not None for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5.0 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        _panel(ax, rows, key)
    if metric in keys:
        pts = [r for r in rows if r.get(metric) is not None]
        first, last = pts[0], pts[-1]
        title = (
            f"{title}: {metric} {first[metric]:.3f} (round {first['round']}) → "
            f"{last[metric]:.3f} (round {last['round']})"
        )
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def run_story(
    rows: list[dict[str, Any]], path: str | Path, metric: str | None = None, title: str = "run"
) -> None:
    """``story_figure`` written to ``path`` (nothing when the rows hold neither series)."""
    fig = story_figure(rows, metric, title)
    if fig is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _sim_hours(row: dict[str, Any]) -> float:
    return float(row.get("sim_time") or 0.0) / 3600.0


def sim_time_panel(
    ax: Axes, runs: dict[str, list[dict[str, Any]]], metric: str, title: str = "run"
) -> None:
    """``metric`` against *simulated* time (hours, ``federated/clock.py``) on ``ax``, one
    line per run (e.g. per round policy), with its 95% interval where rows carry one."""
    values: list[float] = []
    for i, (name, rows) in enumerate(runs.items()):
        pts = [r for r in rows if r.get(metric) is not None]
        if not pts:
            continue
        y = [float(r[metric]) for r in pts]
        values += y
        ax.plot([_sim_hours(r) for r in pts], y, marker="o", color=f"C{i}", label=name)
        band = [r for r in pts if r.get(f"{metric}_lo") is not None]
        if band:
            ax.fill_between(
                [_sim_hours(r) for r in band],
                [r[f"{metric}_lo"] for r in band],
                [r[f"{metric}_hi"] for r in band],
                alpha=0.15,
                color=f"C{i}",
                lw=0,
            )
    _y_range(ax, metric, values)
    ax.set_xlim(left=0.0)
    ax.set_xlabel("simulated time (hours)")
    ax.set_title(f"{title}: {label(metric)} against simulated time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def sim_time_figure(
    runs: dict[str, list[dict[str, Any]]], metric: str | None = None, title: str = "run"
) -> Figure | None:
    """``sim_time_panel`` of the main metric as a figure; None when no row holds it."""
    metric = metric or next((main_metric(r) for r in runs.values() if main_metric(r)), None)
    if metric is None:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    sim_time_panel(ax, runs, metric, title)
    fig.tight_layout()
    return fig


def metric_vs_sim_time(
    runs: dict[str, list[dict[str, Any]]],
    path: str | Path,
    metric: str | None = None,
    title: str = "run",
) -> None:
    """``sim_time_figure`` written to ``path`` (nothing when no row holds the metric)."""
    fig = sim_time_figure(runs, metric, title)
    if fig is not None:
        fig.savefig(path, dpi=110)
        plt.close(fig)


def loss_curve(losses: list[float], path: str | Path, title: str = "training loss") -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=1, alpha=0.5, label="step")
    if len(losses) >= 5:
        w = max(2, len(losses) // 20)
        smooth = [
            sum(losses[max(0, i - w + 1) : i + 1]) / len(losses[max(0, i - w + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(range(1, len(losses) + 1), smooth, lw=2, label=f"mean of {w}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if losses and min(losses) >= 0:
        ax.set_ylim(0.0, max(losses) * 1.1 or 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
