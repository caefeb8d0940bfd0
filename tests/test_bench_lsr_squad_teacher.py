"""benchmarks/lsr_squad_teacher.py's run rows: the paired gains an LSR run reports, with
its retriever settings; a run without a before-evaluation is refused, named."""

from __future__ import annotations

import json

import pytest

from benchmarks.lsr_squad_teacher import run_row


def _run(tmp_path, gain: dict) -> object:
    run = tmp_path / "full2e-5"
    run.mkdir()
    res = {
        "config": {"retriever": {"train": "full"}, "train": {"retriever_lr": 2e-5}},
        "gain": gain,
        "steps": 150,
        "num_eval": 1000,
        "timings": {"train_s": 2550.4},
    }
    (run / "results.json").write_text(json.dumps(res))
    return run


def test_run_row_reports_the_paired_gains_and_settings(tmp_path):
    gain = {
        k: {"mean": 0.01, "lo": -0.004, "hi": 0.024, "n": 1000}
        for k in ("recall@1", "recall@5", "mrr")
    }
    row = run_row(_run(tmp_path, gain))
    assert row["run"] == "full2e-5" and row["query encoder"] == "full"
    assert row["retriever_lr"] == 2e-5 and row["steps"] == 150 and row["eval questions"] == 1000
    assert row["recall@1 gain"] == 0.01 and row["recall@1 gain 95% CI"] == "[-0.004, +0.024]"
    assert row["train s"] == 2550


def test_run_without_a_before_evaluation_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="full2e-5: no paired gain"):
        run_row(_run(tmp_path, {}))
