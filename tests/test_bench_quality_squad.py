"""benchmarks/quality_squad.py's publishing parts: the figure is drawn from the summary it
publishes, and a row's thread count is read back from the command that ran it (a share of
the matmul peak is only given against a peak measured with as many threads)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

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
