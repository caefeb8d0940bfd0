"""Data loading (PubMedQA, JSONL/JSON/Parquet through `datasets`), errors that point at the
offending line/row/key, train/eval split and client partitions."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from shared_data import SQUAD, pubmedqa_sample_path, pubmedqa_sample_raw

from fedrag_ray.config import DataConfig
from fedrag_ray.data import (
    DataError,
    QAExample,
    load_corpus_rows,
    load_dataset_from_config,
    load_pubmedqa,
    load_qa_rows,
    load_squad,
    partition_examples,
    resolve_data_path,
    split_train_eval,
)

# --------------------------------------------------------------------------- PubMedQA


def test_bundled_pubmedqa_sample(pubmedqa_sample):
    examples, passages = pubmedqa_sample
    assert len(examples) == 200
    assert len(passages) == 679
    assert len({p.id for p in passages}) == 679
    assert len({e.id for e in examples}) == 200
    raw = pubmedqa_sample_raw()
    first_id, first = next(iter(raw.items()))
    ex = examples[0]
    assert ex.id == first_id and ex.question == first["QUESTION"]
    assert ex.answer == ex.label == first["final_decision"]
    assert ex.long_answer == first["LONG_ANSWER"]
    assert ex.gold_doc_ids == [first_id]
    own = [p for p in passages if p.doc_id == first_id]
    assert [p.text for p in own] == first["CONTEXTS"]
    assert [p.id for p in own] == [f"{first_id}:{i}" for i in range(len(own))]
    assert Counter(e.label for e in examples) == Counter(v["final_decision"] for v in raw.values())
    docs = {p.doc_id for p in passages}
    assert all(e.gold_doc_ids[0] in docs for e in examples)


def _sample_items(n: int = 3) -> dict:
    raw = pubmedqa_sample_raw()
    return dict(list(raw.items())[:n])


def test_pubmedqa_missing_field_names_file_and_key(tmp_path):
    items = _sample_items()
    bad_key = list(items)[1]
    del items[bad_key]["QUESTION"]
    path = tmp_path / "pqa.json"
    path.write_text(json.dumps(items))
    with pytest.raises(DataError) as exc:
        load_pubmedqa(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert repr(bad_key) in msg
    assert "'QUESTION'" in msg


def test_pubmedqa_bad_values(tmp_path):
    items = _sample_items()
    key = list(items)[2]
    items[key]["final_decision"] = "perhaps"
    path = tmp_path / "pqa.json"
    path.write_text(json.dumps(items))
    with pytest.raises(DataError, match=rf"key '{key}'.*yes/no/maybe.*'perhaps'"):
        load_pubmedqa(path)
    items = _sample_items()
    items[key]["CONTEXTS"] = []
    path.write_text(json.dumps(items))
    with pytest.raises(DataError, match=rf"key '{key}'.*CONTEXTS"):
        load_pubmedqa(path)
    path.write_text('{"1": {\n"QUESTION": "x",\n oops}')
    with pytest.raises(DataError, match=r"pqa.json: line 3: invalid JSON"):
        load_pubmedqa(path)


def test_missing_data_file(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="not found"):
        resolve_data_path(str(tmp_path / "no_such_file.json"))
    # a data: path names where it looked and how to get the dataset
    monkeypatch.setenv("FEDRAG_RAY_DATA", str(tmp_path))
    with pytest.raises(DataError) as exc:
        resolve_data_path("data:squad/squad-train-v1.1.json.gz")
    msg = str(exc.value)
    assert str(tmp_path / "squad" / "squad-train-v1.1.json.gz") in msg
    assert "fedrag-ray data download squad" in msg


def test_dataset_from_config_split_and_limits():
    sample = str(pubmedqa_sample_path())
    ds = load_dataset_from_config(DataConfig(path=sample))
    assert len(ds.train) == 160 and len(ds.eval) == 40
    assert not {e.id for e in ds.train} & {e.id for e in ds.eval}
    assert len(ds.passages) == 679
    # the default reads the full PQA-L train/validation file from the data directory
    full = load_dataset_from_config(DataConfig())
    assert len(full.train) == 400 and len(full.eval) == 100
    small = load_dataset_from_config(DataConfig(path=sample, max_train=8, max_eval=4, split_seed=1))
    assert len(small.train) == 8 and len(small.eval) == 4
    long = load_dataset_from_config(DataConfig(path=sample, answer="long", max_train=5))
    assert all(e.answer == e.long_answer and e.label in ("yes", "no", "maybe") for e in long.train)


# --------------------------------------------------------------------------- JSONL / JSON


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


QA_ROWS = [
    {"id": "q1", "question": "Is water wet?", "answer": "yes", "gold_ids": ["d1"]},
    {"id": "q2", "question": "Is fire cold?", "answer": "no", "label": "no"},
    {"id": "q3", "question": "Is the sky green?", "answer": "no", "metadata": {"src": "a"}},
]


def test_jsonl_qa_rows_load(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [json.dumps(r) for r in QA_ROWS])
    rows = load_qa_rows(path)
    assert [r.id for r in rows] == ["q1", "q2", "q3"]
    assert rows[0].gold_doc_ids == ["d1"] and rows[1].gold_doc_ids == []
    assert rows[1].label == "no" and rows[0].label is None
    assert rows[2].metadata == {"src": "a"}
    assert rows[2].answer == "no"


def test_jsonl_labels_are_normalised_like_pubmedqa(tmp_path):
    rows = [
        {"question": "a?", "answer": "Yes", "label": " Yes "},
        {"question": "b?", "answer": "no", "label": "NO"},
    ]
    got = load_qa_rows(_jsonl(tmp_path / "qa.jsonl", [json.dumps(r) for r in rows]))
    assert [r.label for r in got] == ["yes", "no"]
    bad = _jsonl(
        tmp_path / "bad.jsonl", [json.dumps({"question": "c?", "answer": "x", "label": 3})]
    )
    with pytest.raises(DataError, match=r"bad.jsonl: line 1: field 'label'"):
        load_qa_rows(bad)


def test_jsonl_invalid_json_names_file_and_line(tmp_path):
    lines = [json.dumps(QA_ROWS[0]), json.dumps(QA_ROWS[1]), '{"question": "x", "answer": ']
    path = _jsonl(tmp_path / "qa.jsonl", lines)
    with pytest.raises(DataError) as exc:
        load_qa_rows(path)
    msg = str(exc.value)
    assert str(path) in msg and "line 3" in msg and "invalid JSON" in msg


def test_jsonl_missing_question_names_line(tmp_path):
    lines = [json.dumps(QA_ROWS[0]), json.dumps({"id": "q2", "answer": "no"})]
    path = _jsonl(tmp_path / "qa.jsonl", lines)
    with pytest.raises(DataError) as exc:
        load_qa_rows(path)
    msg = str(exc.value)
    assert str(path) in msg and "line 2" in msg and "'question'" in msg


def test_jsonl_line_numbers_count_blank_lines(tmp_path):
    lines = [json.dumps(QA_ROWS[0]), "", json.dumps(QA_ROWS[1]), json.dumps({"question": "q"})]
    path = _jsonl(tmp_path / "qa.jsonl", lines)
    with pytest.raises(DataError, match=r"line 4: missing or empty field 'answer'"):
        load_qa_rows(path)


def test_jsonl_non_object_row_and_bad_gold(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [json.dumps(QA_ROWS[0]), "[1, 2]"])
    with pytest.raises(DataError, match="line 2: row must be a JSON object"):
        load_qa_rows(path)
    row = {"question": "q", "answer": "a", "gold_ids": "d1"}
    path = _jsonl(tmp_path / "qa2.jsonl", [json.dumps(row)])
    with pytest.raises(DataError, match="line 1: field 'gold_ids' must be a list"):
        load_qa_rows(path)


def test_corpus_rows_default_doc_id(tmp_path):
    rows = [
        {"id": "p1", "text": "alpha", "doc_id": "d1"},
        {"id": "p2", "text": "beta"},
    ]
    path = _jsonl(tmp_path / "corpus.jsonl", [json.dumps(r) for r in rows])
    passages = load_corpus_rows(path)
    assert [(p.id, p.doc_id, p.text) for p in passages] == [
        ("p1", "d1", "alpha"),
        ("p2", "p2", "beta"),
    ]
    bad = _jsonl(
        tmp_path / "bad.jsonl", [json.dumps(rows[0]), json.dumps({"id": "p3", "text": " "})]
    )
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: missing or empty field 'text'"):
        load_corpus_rows(bad)


def test_json_list_rows(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([QA_ROWS[0], {"question": "no answer"}]))
    with pytest.raises(DataError, match=r"qa.json: row 1: missing or empty field 'answer'"):
        load_qa_rows(path)
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="list of row objects"):
        load_qa_rows(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(DataError, match="unsupported data format '.csv'"):
        load_qa_rows(path)


# --------------------------------------------------------------------------- Parquet


def test_parquet_rows_and_missing_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "qa.parquet"
    pq.write_table(
        pa.table(
            {
                "id": ["a", "b"],
                "question": ["first?", "second?"],
                "answer": ["yes", "no"],
                "gold_ids": [["d1"], ["d2", "d3"]],
            }
        ),
        good,
    )
    rows = load_qa_rows(good)
    assert [(r.id, r.question, r.answer, r.gold_doc_ids) for r in rows] == [
        ("a", "first?", "yes", ["d1"]),
        ("b", "second?", "no", ["d2", "d3"]),
    ]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": ["q0", "q1", None], "answer": ["a", "b", "c"]}), bad)
    with pytest.raises(DataError) as exc:
        load_qa_rows(bad)
    msg = str(exc.value)
    assert str(bad) in msg and "row 2" in msg and "'question'" in msg


def test_qa_jsonl_config_end_to_end(tmp_path):
    qa = _jsonl(tmp_path / "qa.jsonl", [json.dumps(r) for r in QA_ROWS])
    corpus = _jsonl(
        tmp_path / "c.jsonl", [json.dumps({"id": f"d{i}", "text": f"doc {i}"}) for i in range(4)]
    )
    ds = load_dataset_from_config(
        DataConfig(format="qa_jsonl", path=str(qa), corpus=str(corpus), eval_fraction=0.34)
    )
    assert len(ds.train) == 2 and len(ds.eval) == 1 and len(ds.passages) == 4
    with pytest.raises(DataError, match="data.corpus is required"):
        load_dataset_from_config(DataConfig(format="qa_jsonl", path=str(qa)))


# --------------------------------------------------------------------------- split


def _toy(n: int) -> list[QAExample]:
    return [QAExample(id=str(i), question=f"q{i}", answer="a") for i in range(n)]


def test_split_train_eval_deterministic_and_disjoint():
    ex = _toy(50)
    tr1, ev1 = split_train_eval(ex, 0.2, seed=3)
    tr2, ev2 = split_train_eval(ex, 0.2, seed=3)
    assert [e.id for e in ev1] == [e.id for e in ev2] and [e.id for e in tr1] == [e.id for e in tr2]
    assert len(ev1) == 10 and len(tr1) == 40
    assert not {e.id for e in tr1} & {e.id for e in ev1}
    assert {e.id for e in tr1} | {e.id for e in ev1} == {e.id for e in ex}
    _, ev3 = split_train_eval(ex, 0.2, seed=4)
    assert {e.id for e in ev3} != {e.id for e in ev1}
    _, tiny = split_train_eval(_toy(3), 0.01, seed=0)
    assert len(tiny) == 1  # never an empty eval fold


# --------------------------------------------------------------------------- partitions


def _flat(parts: list[list[int]]) -> list[int]:
    return sorted(i for p in parts for i in p)


def _label_skew(examples, parts) -> float:
    """Fraction of examples that carry their client's majority label (iid ~ 0.55 here)."""
    return sum(max(Counter(examples[i].label for i in p).values()) for p in parts) / len(examples)


def test_iid_partition_covers_each_index_once(pubmedqa_sample):
    examples, _ = pubmedqa_sample
    parts = partition_examples(examples, 7, "iid", seed=1)
    assert _flat(parts) == list(range(200))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert parts == partition_examples(examples, 7, "iid", seed=1)
    assert parts != partition_examples(examples, 7, "iid", seed=2)
    assert _label_skew(examples, parts) < 0.65


def test_dirichlet_small_alpha_is_skewed_but_no_client_empty(pubmedqa_sample):
    examples, _ = pubmedqa_sample
    skews = []
    for seed in range(5):
        parts = partition_examples(examples, 6, "dirichlet", alpha=0.05, seed=seed)
        assert _flat(parts) == list(range(200))
        assert all(len(p) >= 1 for p in parts)
        skews.append(_label_skew(examples, parts))
    assert np.mean(skews) > 0.8
    near_iid = partition_examples(examples, 6, "dirichlet", alpha=100.0, seed=0)
    assert _flat(near_iid) == list(range(200))
    assert _label_skew(examples, near_iid) < 0.65


def test_dirichlet_fills_empty_clients():
    # 2 labels, 10 clients, tiny alpha: most clients draw nothing and must be topped up.
    ex = [
        QAExample(id=str(i), question="q", answer="a", label="yes" if i % 2 else "no")
        for i in range(30)
    ]
    parts = partition_examples(ex, 10, "dirichlet", alpha=0.01, seed=0)
    assert all(parts) and _flat(parts) == list(range(30))


def test_field_partition_keeps_each_value_on_one_client(pubmedqa_sample):
    examples, _ = pubmedqa_sample
    parts = partition_examples(examples, 5, "field", field_name="year", seed=0)
    assert _flat(parts) == list(range(200))
    assert all(parts)
    owner: dict[str, set[int]] = {}
    for c, p in enumerate(parts):
        for i in p:
            owner.setdefault(examples[i].metadata["year"], set()).add(c)
    assert len(owner) > 5
    assert all(len(clients) == 1 for clients in owner.values())
    by_label = partition_examples(examples, 3, "field", field_name="label", seed=0)
    assert sorted({examples[i].label for i in p}.pop() for p in by_label) == ["maybe", "no", "yes"]
    assert all(len({examples[i].label for i in p}) == 1 for p in by_label)


def test_partition_errors():
    with pytest.raises(ValueError, match="cannot split 3 examples across 4 clients"):
        partition_examples(_toy(3), 4)
    with pytest.raises(ValueError, match="unknown partition type 'zipf'"):
        partition_examples(_toy(3), 2, "zipf")


# sha256 (first 16 hex) of json.dumps(partition) as computed by the O(C^2) implementation
# before `_fill_empty` and field partitioning moved onto heaps (issue 14):
# the faster code must hand out exactly the same partitions for these seeds.
PARTITIONS_BEFORE_HEAPS = [
    ("sample", 7, "iid", 0.5, "label", 1, "2eb2416f6b97997b"),
    ("sample", 6, "dirichlet", 0.05, "label", 0, "f8d795cb2d6b5de6"),
    ("sample", 6, "dirichlet", 100.0, "label", 3, "f3dd1fb1d0f86703"),
    ("sample", 5, "field", 0.5, "year", 0, "d9c876c8f013c8d4"),
    ("sample", 3, "field", 0.5, "label", 0, "f960604cbf8d061a"),
    ("sample", 50, "field", 0.5, "mesh", 2, "5dc87ba11242142b"),
    ("toy", 10, "dirichlet", 0.01, "label", 0, "378a82bdb0530c93"),
    ("toy", 120, "dirichlet", 0.1, "label", 7, "9302c729938badd5"),
    ("sample", 200, "dirichlet", 0.5, "label", 0, "1f76b32dd13e9b4d"),
]


@pytest.mark.parametrize("case", PARTITIONS_BEFORE_HEAPS, ids=lambda c: "-".join(map(str, c[:6])))
def test_partitions_are_the_same_as_before_the_heaps(pubmedqa_sample, case):
    import hashlib

    name, clients, kind, alpha, field_name, seed, digest = case
    toy = [
        QAExample(id=str(i), question="q", answer="a", label="yes" if i % 2 else "no")
        for i in range(300)
    ]
    examples = pubmedqa_sample[0] if name == "sample" else toy
    parts = partition_examples(examples, clients, kind, alpha, field_name, seed)
    assert hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16] == digest


@pytest.mark.timeout(120)
def test_partitioning_100k_clients_is_linear_time():
    """10^5 clients over 2x10^5 questions: the old fill-empty scan (O(C^2)) and field
    assignment (O(groups x C)) took hours here; now seconds."""
    import time

    ex = [
        QAExample(id=str(i), question="q", answer="a", label=("yes", "no", "maybe")[i % 3])
        for i in range(200_000)
    ]
    for i, e in enumerate(ex):
        e.metadata["year"] = str(i % 5000)
    for kind, field_name in (("dirichlet", "label"), ("field", "year"), ("iid", "label")):
        t = time.perf_counter()
        parts = partition_examples(ex, 100_000, kind, 0.5, field_name, seed=0)
        seconds = time.perf_counter() - t
        assert len(parts) == 100_000 and all(parts), kind
        assert sum(len(p) for p in parts) == 200_000
        assert seconds < 20, (kind, seconds)


# --------------------------------------------------------------------------- SQuAD


def _squad_file(tmp_path, articles, gz=False):
    import gzip

    doc = json.dumps({"version": "1.1", "data": articles})
    path = tmp_path / ("squad.json.gz" if gz else "squad.json")
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(doc)
    else:
        path.write_text(doc)
    return path


def _article(title, paragraphs):
    return {
        "title": title,
        "paragraphs": [
            {
                "context": ctx,
                "qas": [
                    {
                        "id": f"{title}-{p}-{q}",
                        "question": qu,
                        "answers": [{"text": a} for a in ans],
                    }
                    for q, (qu, ans) in enumerate(qas)
                ],
            }
            for p, (ctx, qas) in enumerate(paragraphs)
        ],
    }


def test_squad_loader_passages_gold_and_all_answers(tmp_path):
    arts = [
        _article("Alpha", [("Alpha was founded in 1900.", [("When?", ["1900", "in 1900"])])]),
        _article("Beta", [("Beta is blue.", [("Colour?", ["blue"])]), ("No questions.", [])]),
    ]
    for gz in (False, True):
        examples, passages = load_squad(_squad_file(tmp_path, arts, gz))
        # every paragraph is a passage, also one without questions (open-domain corpus)
        assert [p.id for p in passages] == ["0:0", "1:0", "1:1"]
        assert [p.metadata["title"] for p in passages] == ["Alpha", "Beta", "Beta"]
        assert [e.gold_doc_ids for e in examples] == [["0:0"], ["1:0"]]
        assert examples[0].answers == ["1900", "in 1900"] and examples[0].answer == "1900"
        assert examples[1].metadata["title"] == "Beta"


def test_squad_malformed_rows_name_file_article_and_question(tmp_path):
    arts = [_article("Alpha", [("Text.", [("Q?", ["a"]), ("Q2?", ["  "])])])]
    path = _squad_file(tmp_path, arts)
    with pytest.raises(DataError) as exc:
        load_squad(path)
    msg = str(exc.value)
    assert str(path) in msg and "'Alpha'" in msg and "paragraph 0, question 1" in msg
    path.write_text('{"data": [\n{"title": "x",\n oops}]}')
    with pytest.raises(DataError, match=r"squad.json: line 3: invalid JSON"):
        load_squad(path)
    path.write_text('{"version": "1.1"}')
    with pytest.raises(DataError, match="'data' list"):
        load_squad(path)
    bad_gz = tmp_path / "bad.json.gz"
    bad_gz.write_text("not gzip")
    with pytest.raises(DataError, match="bad.json.gz: cannot be read"):
        load_squad(bad_gz)


def test_squad_split_by_article_never_shares_a_paragraph():
    cfg = DataConfig(format="squad", path=SQUAD, max_articles=40, eval_fraction=0.25)
    ds = load_dataset_from_config(cfg)
    train_titles = {e.metadata["title"] for e in ds.train}
    eval_titles = {e.metadata["title"] for e in ds.eval}
    assert len(train_titles) == 30 and len(eval_titles) == 10
    assert not train_titles & eval_titles
    assert not {d for e in ds.train for d in e.gold_doc_ids} & {
        d for e in ds.eval for d in e.gold_doc_ids
    }
    # the corpus holds every paragraph of the kept articles, the eval ones included
    assert {p.metadata["title"] for p in ds.passages} == train_titles | eval_titles
    ids = {p.doc_id for p in ds.passages}
    assert all(e.gold_doc_ids[0] in ids for e in ds.train + ds.eval)
    # caps are seeded samples across articles, not the first n questions
    capped = load_dataset_from_config(cfg.model_copy(update={"max_train": 50, "max_eval": 30}))
    assert len(capped.train) == 50 and len(capped.eval) == 30
    assert len({e.metadata["title"] for e in capped.eval}) > 5
    again = load_dataset_from_config(cfg.model_copy(update={"max_train": 50, "max_eval": 30}))
    assert [e.id for e in again.eval] == [e.id for e in capped.eval]


def test_squad_full_file_counts():
    examples, passages = load_squad(resolve_data_path(SQUAD))
    assert len(examples) == 87599 and len(passages) == 18896
    assert len({e.metadata["title"] for e in examples}) == 442
