"""Benchmark figures: one look, saved as PNG, axes that do not mislead.

Matplotlib's object API (``Figure``), not pyplot: no global backend to select, no figure
left open after saving. Quantities that cannot be negative (bytes, memory, seconds) get a
y axis from 0; rates (recall, accuracy) get 0 to 1; counts (rounds, clients) get integer
ticks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.4, 4.0), **kw: Any):
    """(figure, axes) as ``plt.subplots`` returns them (``squeeze`` and the rest go to
    ``Figure.subplots``)."""
    fig = Figure(figsize=size)
    return fig, fig.subplots(nrows, ncols, **kw)


def save(
    fig: Figure,
    path: str | Path,
    dpi: int = 110,
    rect: tuple[float, float, float, float] | None = None,
) -> Path:
    """Lay out and write ``fig`` as a PNG at ``path``; ``rect`` keeps room for a note."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    return Path(path)


def integer_ticks(ax: Axes, axis: str = "x") -> None:
    """Only whole numbers on ``axis`` (rounds, clients, steps)."""
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def zero_based(ax: Axes) -> None:
    """A linear y axis from 0 (bytes, memory, seconds): bars and lines compare by height.
    Call after plotting."""
    ax.set_ylim(bottom=0)


def rate_axis(ax: Axes, label: str | None = None) -> None:
    """A y axis from 0 to 1 (a little headroom so a value of 1 shows) for rates."""
    ax.set_ylim(0, 1.05)
    if label:
        ax.set_ylabel(label)
