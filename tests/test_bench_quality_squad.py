"""benchmarks/quality_squad.py's publishing parts: the figure is drawn from the summary it
publishes, and a row's thread count is read back from the command that ran it (a share of
the matmul peak is only given against a peak measured with as many threads)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "quality_squad.json"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def quality_squad(monkeypatch):
    """The script as it runs (``python benchmarks/quality_squad.py``: its folder first on
    the path, where its ``harness`` import resolves)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("quality_squad")


def test_figure_is_a_png_drawn_from_the_published_rows_and_comparisons(quality_squad, tmp_path):
    doc = json.loads(FIXTURE.read_text())
    path = tmp_path / "quality_squad.png"
    quality_squad.plot(doc["rows"], doc["comparisons"], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000  # two panels, not an empty canvas


def test_row_threads_come_from_the_recorded_command(quality_squad, tmp_path, monkeypatch):
    monkeypatch.setattr(quality_squad, "RUNS", tmp_path)
    for name, command in [
        ("two", "python benchmarks/quality_squad.py --threads 2 --only two"),
        ("default", "python benchmarks/quality_squad.py --only default"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "row.json").write_text(json.dumps({"command": command}))
    assert quality_squad.row_threads("two") == 2
    assert quality_squad.row_threads("default") is None  # all threads: no peak share
    assert quality_squad.row_threads("never_ran") is None


def test_federated_targets_are_judged_on_three_seeds_only(quality_squad):
    """A federation run on fewer than 3 seeds is shown beside the issue's targets, never
    counted as meeting or missing them; with 3 its comparisons carry them."""
    rng = np.random.default_rng(0)

    def run(p: float) -> dict:
        return {"per_question_after": {"exact_match": (rng.random(400) < p).astype(float).tolist()}}

    central = [run(0.3) for _ in range(3)]
    local = [run(0.1) for _ in range(8)]
    ev = {"samples": 500, "confidence": 0.95, "seed": 0}
    one = quality_squad._federated_comparisons("f", "fed", [run(0.3)], central, local, ev)
    three = quality_squad._federated_comparisons("f", "fed", [run(0.3)] * 3, central, local, ev)
    assert [c["name"] for c in one] == ["f_vs_local_mean", "f_vs_local_worst", "f_vs_central"]
    assert all(c["target"] is None and c["met"] is None for c in one)
    assert all(c["label"].startswith("fed, 1 seed vs ") for c in one)
    by_name = {c["name"]: c for c in three}
    assert by_name["f_vs_local_mean"]["target"] == ">= +0.05"
    assert by_name["f_vs_local_mean"]["met"] is True  # 0.3 vs 0.1 on 400 questions
    assert by_name["f_vs_central"]["target"] == ">= -0.03"
    assert by_name["f_vs_central"]["seeds"] == 3
