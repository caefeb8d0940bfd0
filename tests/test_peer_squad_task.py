"""The peer's SQuAD row is scored like ours (``benchmarks/peer/squad_task.py``): EM / F1 on
the answer's first line, best over the gold answers; recall@1 of the retrieved paragraph;
and our rows' per-question scores are paired with the peer's by question id, never by
position."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

SQUAD_TASK = Path(__file__).resolve().parents[1] / "benchmarks" / "peer" / "squad_task.py"


@pytest.fixture(scope="module")
def squad_task() -> ModuleType:
    spec = importlib.util.spec_from_file_location("squad_task", SQUAD_TASK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JOB = {
    "eval": [
        {"id": "a", "question": "?", "answers": ["Eiffel Tower", "the tower"], "gold": ["0:1"]},
        {"id": "b", "question": "?", "answers": ["1889"], "gold": ["0:2"]},
        {"id": "c", "question": "?", "answers": ["Paris"], "gold": ["1:0"]},
    ]
}


def test_score_first_line_best_answer_and_recall(squad_task: ModuleType) -> None:
    predictions = [  # order differs from the job's on purpose
        {"id": "c", "response": "Paris, France", "retrieved": ["1:0"]},
        {"id": "a", "response": " The Eiffel Tower.\nIt was built in 1889.", "retrieved": ["0:2"]},
        {"id": "b", "response": "in 1889", "retrieved": ["0:2"]},
    ]
    got = squad_task.score(JOB, predictions)
    # a: first line "The Eiffel Tower." normalises to "eiffel tower" (EM 1)
    # b: "in 1889" vs "1889": precision 1/2, recall 1 -> F1 2/3
    # c: "paris france" vs "paris": precision 1/2, recall 1 -> F1 2/3
    assert got["exact_match"] == [1.0, 0.0, 0.0]
    assert got["f1"] == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert got["recall@1"] == [0.0, 1.0, 1.0]


def _row(tmp: Path, name: str, ids: list[str], em: list[float]) -> None:
    (tmp / name).mkdir(parents=True)
    res = {"eval_ids": ids, "per_question_after": {"exact_match": em}}
    (tmp / name / "results.json").write_text(json.dumps(res))


def test_our_rows_are_paired_by_question_id(squad_task: ModuleType, tmp_path: Path) -> None:
    # our row evaluated 4 questions in another order; the peer 3 of them
    _row(tmp_path, "ralt_s0", ["c", "x", "a", "b"], [1.0, 0.0, 1.0, 0.0])
    ours = squad_task.ours_per_question(tmp_path / "ralt_s0", ["a", "b", "c"])
    assert ours["exact_match"].tolist() == [1.0, 0.0, 1.0]
    # a row that lacks one of the peer's questions cannot be paired
    _row(tmp_path, "zero_shot", ["a", "b"], [0.0, 0.0])
    assert squad_task.ours_per_question(tmp_path / "zero_shot", ["a", "b", "c"]) is None
    assert squad_task.ours_per_question(tmp_path / "absent", ["a"]) is None

    peer = {"exact_match": [1.0, 1.0, 0.0], "f1": [1.0, 1.0, 0.0], "recall@1": [1.0, 1.0, 1.0]}
    rows = squad_task.comparisons(peer, ["a", "b", "c"], tmp_path)
    assert [(r["name"], r["metric"]) for r in rows] == [("peer_vs_ralt_s0", "exact_match")]
    # paired differences a: 0, b: +1, c: -1
    assert rows[0]["diff"] == pytest.approx(0.0)
    assert rows[0]["questions"] == 3
