"""The side by side as one PNG: per-round seconds, summed peak RSS and bytes per round,
peer next to ours for every (method, K) cell, each bar pair labelled peer / ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .job import MB


def plot(cells: dict[str, Any], path: Path) -> None:
    from harness.plots import figure, save, zero_based

    keys = list(cells)
    labels = [k.upper().replace("-K", "\nK=") for k in keys]
    panels = [
        ("round_s", "per-round seconds (median)", 1.0, False),
        ("rss_gib", "peak summed RSS, GiB", 1.0, False),
        ("bytes_per_round", "MB per round (log)", 1 / MB, True),
    ]
    fig, axes = figure(3, size=(14, 4.6))
    width = 0.38
    for ax, (field, title, scale, logy) in zip(axes, panels, strict=True):
        peer = [(cells[k]["peer"].get(field) or 0) * scale for k in keys]
        ours = [(cells[k]["ours"].get(field) or 0) * scale for k in keys]
        xs = range(len(keys))
        ax.bar([x - width / 2 for x in xs], peer, width, label="fed-rag 0.0.27", color="#c0504d")
        ax.bar([x + width / 2 for x in xs], ours, width, label="fedrag_ray", color="#4f81bd")
        for x, p, o in zip(xs, peer, ours, strict=True):
            if o:
                ax.annotate(
                    f"{p / o:.0f}×" if p / o >= 10 else f"{p / o:.1f}×",
                    (x, max(p, o)),
                    ha="center",
                    va="bottom",
                    fontsize=9,
                )
        ax.set_xticks(list(xs), labels)
        ax.set_title(title)
        if logy:
            ax.set_yscale("log")
        ax.margins(y=0.15)
        if not logy:
            zero_based(ax)
    axes[0].legend(loc="upper left", fontsize=9)
    fig.suptitle(
        "Same federated RAG job (3 rounds, 5 local steps, batch 4, 64 PubMedQA questions, "
        "500 passages; 2 CPU cores); labels: peer / ours",
        fontsize=10,
    )
    save(fig, path, dpi=120)
