"""QA and corpus loading (SQuAD, PubMedQA, JSONL/JSON, Parquet via `datasets`), validation,
and partitioning of questions across federated clients.

A malformed row fails with a :class:`DataError` that names the file and the line (JSONL),
row (Parquet), key (PubMedQA's JSON object) or article/paragraph/question (SQuAD), so a
user can fix the data without a debugger.

Datasets are never shipped inside the package: paths written ``data:<relative path>`` are
read from the data directory (:func:`data_dir`), which ``fedrag-ray data download``
fills.
"""

from __future__ import annotations

import gzip
import heapq
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedrag_ray.config import PACKAGE_DIR, DataConfig

if TYPE_CHECKING:
    from fedrag_ray.config import ExperimentConfig

DATA_DIR_ENV = "FEDRAG_RAY_DATA"
DATA_PREFIX = "data:"
# A checkout next to the shared data folder (this project's CI and dev machines) reads it
# there; anyone else gets the user cache that ``fedrag-ray data download`` fills.
_SHARED_DATA = PACKAGE_DIR.parent.parent / "shared" / "data"


class DataError(ValueError):
    """A data file that cannot be used; the message names file and line/key."""


@dataclass
class Passage:
    id: str
    text: str
    doc_id: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class QAExample:
    id: str
    question: str
    answer: str
    gold_doc_ids: list[str] = field(default_factory=list)
    label: str | None = None
    # every accepted answer (SQuAD has several per question in its dev set); EM and F1 take
    # the best over them. Empty means ``[answer]``.
    answers: list[str] = field(default_factory=list)
    long_answer: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class RagDataset:
    train: list[QAExample]
    eval: list[QAExample]
    passages: list[Passage]


def data_dir() -> Path:
    """Where ``data:`` paths live: ``$FEDRAG_RAY_DATA``, else ``../shared/data`` beside
    this checkout where it exists, else ``~/.cache/fedrag_ray/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    if _SHARED_DATA.is_dir():
        return _SHARED_DATA
    return Path.home() / ".cache" / "fedrag_ray" / "data"


def resolve_data_path(path: str, field: str = "data.path") -> Path:
    """A plain path, or ``data:<relative path>`` inside :func:`data_dir`. A missing file
    is an error that names ``field`` (the config field the path came from), says where it
    was looked for and how to get it."""
    if path.startswith(DATA_PREFIX):
        rel = path[len(DATA_PREFIX) :]
        p = data_dir() / rel
        if not p.exists():
            dataset = Path(rel).parts[0] if Path(rel).parts else rel
            raise DataError(
                f"{field}: data file not found: {p} (data directory {data_dir()}, set by "
                f"${DATA_DIR_ENV}; get the dataset with `fedrag-ray data download {dataset}`)"
            )
        return p
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{field}: data file not found: {p}")
    if not p.is_file():
        raise DataError(f"{field}: {p} is a directory, not a data file")
    return p


def _read_json(path: Path) -> Any:
    """JSON, gzip-compressed when the name ends in ``.gz``; a syntax error names its line."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return json.load(f)
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
    except (OSError, EOFError) as err:  # a truncated or non-gzip .gz file
        raise DataError(f"{path}: cannot be read ({err})") from None


# --------------------------------------------------------------------------- PubMedQA


def normalize_label(label: str) -> str:
    """Class labels compared with ``rag.label_options``: stripped and lower-cased, as
    PubMedQA's ``final_decision`` is."""
    return label.strip().lower()


_PUBMEDQA_REQUIRED = {
    "QUESTION": str,
    "CONTEXTS": list,
    "LONG_ANSWER": str,
    "final_decision": str,
}


def load_pubmedqa(path: str | Path) -> tuple[list[QAExample], list[Passage]]:
    """PQA-L format: {pmid: {QUESTION, CONTEXTS[], LABELS[], MESHES[], YEAR, LONG_ANSWER,
    final_decision}}. One passage per abstract section; gold doc = the question's pmid."""
    path = Path(path)
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: top level must be an object keyed by PubMed id")
    examples, passages = [], []
    for pmid, item in raw.items():
        where = f"{path}: key {pmid!r}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: value must be an object")
        for key, typ in _PUBMEDQA_REQUIRED.items():
            if key not in item:
                raise DataError(f"{where}: missing field {key!r}")
            if not isinstance(item[key], typ):
                raise DataError(f"{where}: field {key!r} must be {typ.__name__}")
        label = normalize_label(item["final_decision"])
        if label not in ("yes", "no", "maybe"):
            raise DataError(f"{where}: final_decision must be yes/no/maybe, got {label!r}")
        contexts = item["CONTEXTS"]
        if not contexts or not all(isinstance(c, str) and c.strip() for c in contexts):
            raise DataError(f"{where}: CONTEXTS must be a non-empty list of strings")
        section_labels = item.get("LABELS") or [""] * len(contexts)
        for i, text in enumerate(contexts):
            section = section_labels[i] if i < len(section_labels) else ""
            passages.append(
                Passage(
                    id=f"{pmid}:{i}", text=text, doc_id=str(pmid), metadata={"section": section}
                )
            )
        examples.append(
            QAExample(
                id=str(pmid),
                question=item["QUESTION"],
                answer=label,
                gold_doc_ids=[str(pmid)],
                label=label,
                long_answer=item["LONG_ANSWER"],
                metadata={
                    "year": str(item.get("YEAR", "")),
                    "mesh": (item.get("MESHES") or [""])[0],
                    "label": label,
                },
            )
        )
    return examples, passages


# --------------------------------------------------------------------------- SQuAD


def load_squad(path: str | Path) -> tuple[list[QAExample], list[Passage]]:
    """SQuAD v1.1 JSON (``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
    "question", "answers": [{"text", ...}]}]}]}]}``), plain or ``.gz``.

    One passage per paragraph (id ``<article index>:<paragraph index>``, also its
    ``doc_id``: the gold passage of a question is its own paragraph); every paragraph of
    the file goes into the corpus, so retrieval is open-domain over all articles. Every
    gold answer is kept (EM/F1 take the best); the article title is kept in each
    question's and passage's ``metadata["title"]`` for partitions and article splits."""
    path = Path(path)
    raw = _read_json(path)
    articles = raw.get("data") if isinstance(raw, dict) else None
    if not isinstance(articles, list):
        raise DataError(f"{path}: top level must be an object with a 'data' list (SQuAD)")
    examples: list[QAExample] = []
    passages: list[Passage] = []
    for a, article in enumerate(articles):
        title = article.get("title") if isinstance(article, dict) else None
        where_a = f"{path}: article {a} ({title!r})"
        if not isinstance(title, str) or not isinstance(article.get("paragraphs"), list):
            raise DataError(f"{where_a}: needs a 'title' string and a 'paragraphs' list")
        for p, para in enumerate(article["paragraphs"]):
            where_p = f"{where_a}, paragraph {p}"
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str) or not context.strip():
                raise DataError(f"{where_p}: missing or empty 'context'")
            pid = f"{a}:{p}"
            passages.append(Passage(id=pid, text=context, doc_id=pid, metadata={"title": title}))
            for q, qa in enumerate(para.get("qas") or []):
                where_q = f"{where_p}, question {q}"
                question = qa.get("question") if isinstance(qa, dict) else None
                if not isinstance(question, str) or not question.strip():
                    raise DataError(f"{where_q}: missing or empty 'question'")
                answers = [x.get("text") for x in qa.get("answers") or [] if isinstance(x, dict)]
                answers = [x.strip() for x in answers if isinstance(x, str) and x.strip()]
                if not answers:
                    raise DataError(f"{where_q}: no answer with a non-empty 'text'")
                examples.append(
                    QAExample(
                        id=str(qa.get("id") or f"{pid}:{q}"),
                        question=question.strip(),
                        answer=answers[0],
                        answers=list(dict.fromkeys(answers)),
                        gold_doc_ids=[pid],
                        metadata={"title": title},
                    )
                )
    if not examples:
        raise DataError(f"{path}: no questions")
    return examples, passages


def split_by_field(
    examples: Sequence[QAExample], field_name: str, eval_fraction: float, seed: int
) -> tuple[list[QAExample], list[QAExample]]:
    """Held-out questions by whole groups (SQuAD: by article), so no evaluation
    paragraph's questions are trained on. A seeded choice of groups; both sides keep the
    file's order."""
    groups = sorted({_field_value(e, field_name) for e in examples})
    if len(groups) < 2:
        raise DataError(f"cannot split by {field_name!r}: fewer than 2 distinct values")
    order = np.random.default_rng(seed).permutation(len(groups))
    n_eval = min(len(groups) - 1, max(1, int(round(len(groups) * eval_fraction))))
    held = {groups[i] for i in order[:n_eval].tolist()}
    train = [e for e in examples if _field_value(e, field_name) not in held]
    return train, [e for e in examples if _field_value(e, field_name) in held]


def _sample(examples: list[QAExample], n: int | None, seed: int) -> list[QAExample]:
    """``n`` questions drawn without replacement (seeded), in file order: a cap that still
    spreads over every article, unlike the first ``n``."""
    if not n or n >= len(examples):
        return examples
    keep = set(np.random.default_rng(seed).choice(len(examples), n, replace=False).tolist())
    return [e for i, e in enumerate(examples) if i in keep]


# --------------------------------------------------------------------------- generic rows


def _read_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows with a human location ("line 7", "row 3").

    JSON and JSONL are parsed here, line by line, so a syntax error names its line;
    Parquet goes through `datasets`, imported only then: it brings pyarrow and pandas
    (~100 MiB resident) into every client actor that loads its partition.
    """
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno}: row must be a JSON object")
            rows.append((f"line {lineno}", row))
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of row objects")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {i}: row must be a JSON object")
        return [(f"row {i}", row) for i, row in enumerate(data)]
    if suffix != ".parquet":
        raise DataError(f"{path}: unsupported data format {suffix!r} (jsonl, json, parquet)")
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as err:  # datasets wraps pyarrow errors in many types
        raise DataError(f"{path}: could not be loaded by datasets: {err}") from None
    return [(f"row {i}", row) for i, row in enumerate(ds.to_list())]


def _field(row: dict[str, Any], key: str, where: str, required: bool = True) -> Any:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataError(f"{where}: missing or empty field {key!r}")
        return None
    return value


def _metadata(row: dict[str, Any], where: str) -> dict[str, Any]:
    value = row.get("metadata") or {}
    if not isinstance(value, dict):
        raise DataError(f"{where}: field 'metadata' must be an object")
    return dict(value)


def load_qa_rows(path: str | Path) -> list[QAExample]:
    """Rows {id?, question, answer, gold_ids?: [doc ids], label?, metadata?}."""
    path = Path(path)
    out = []
    for loc, row in _read_rows(path):
        where = f"{path}: {loc}"
        question = _field(row, "question", where)
        answer = _field(row, "answer", where)
        gold = row.get("gold_ids") or []
        if not isinstance(gold, list):
            raise DataError(f"{where}: field 'gold_ids' must be a list")
        label = row.get("label")
        if label is not None:
            if not isinstance(label, str) or not label.strip():
                raise DataError(f"{where}: field 'label' must be a non-empty string")
            label = normalize_label(label)  # "Yes " must match the option "yes"
        out.append(
            QAExample(
                id=str(row.get("id") or len(out)),
                question=str(question),
                answer=str(answer),
                gold_doc_ids=[str(g) for g in gold],
                label=label,
                metadata=_metadata(row, where),
            )
        )
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def load_corpus_rows(path: str | Path) -> list[Passage]:
    """Rows {id, text, doc_id?, metadata?}; doc_id defaults to id."""
    path = Path(path)
    out = []
    for loc, row in _read_rows(path):
        where = f"{path}: {loc}"
        pid = str(_field(row, "id", where))
        text = str(_field(row, "text", where))
        out.append(
            Passage(
                id=pid,
                text=text,
                doc_id=str(row.get("doc_id") or pid),
                metadata=_metadata(row, where),
            )
        )
    if not out:
        raise DataError(f"{path}: no rows")
    return out


# --------------------------------------------------------------------------- dataset


def check_gold_ids(
    examples: Sequence[QAExample], passages: Sequence[Passage], qa_file: str, corpus: str
) -> None:
    """Refuse questions whose ``gold_ids`` name no ``doc_id`` of the corpus: retrieval
    could never hit them, and recall would read 0 for a typo in the data (ids are
    compared as strings: 7 and "7" match, "doc7" and "7" do not)."""
    doc_ids = {p.doc_id for p in passages}
    bad = [e for e in examples if e.gold_doc_ids and not doc_ids & set(e.gold_doc_ids)]
    if bad:
        first = bad[0]
        raise DataError(
            f"{qa_file}: {len(bad)} of {len(examples)} questions have gold_ids that match no "
            f"doc_id of data.corpus {corpus} (first: question id {first.id!r}, gold_ids "
            f"{first.gold_doc_ids[:3]}; corpus doc_ids look like {sorted(doc_ids)[:2]})"
        )


def split_train_eval(
    examples: Sequence[QAExample], eval_fraction: float, seed: int
) -> tuple[list[QAExample], list[QAExample]]:
    """A fixed held-out fold: the same seed always gives the same questions."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_eval = max(1, int(round(len(examples) * eval_fraction)))
    eval_idx = set(order[:n_eval].tolist())
    train = [e for i, e in enumerate(examples) if i not in eval_idx]
    held = [e for i, e in enumerate(examples) if i in eval_idx]
    return train, held


def _load_squad_dataset(cfg: DataConfig) -> RagDataset:
    examples, passages = load_squad(resolve_data_path(cfg.path))
    if cfg.max_articles:
        titles = sorted({e.metadata["title"] for e in examples})
        if cfg.max_articles < len(titles):
            rng = np.random.default_rng(cfg.split_seed)
            keep = {titles[i] for i in rng.choice(len(titles), cfg.max_articles, replace=False)}
            examples = [e for e in examples if e.metadata["title"] in keep]
            passages = [p for p in passages if p.metadata["title"] in keep]
    if cfg.eval_path:
        held, eval_passages = load_squad(resolve_data_path(cfg.eval_path))
        train = examples
        known = {p.id for p in passages}
        passages += [p for p in eval_passages if p.id not in known]
    else:
        train, held = split_by_field(examples, "title", cfg.eval_fraction, cfg.split_seed)
    # Seeded samples rather than the first n: the caps then spread over the articles.
    train = _sample(train, cfg.max_train, cfg.split_seed + 1)
    held = _sample(held, cfg.max_eval, cfg.split_seed + 2)
    return RagDataset(train=train, eval=held, passages=passages)


def load_dataset_from_config(cfg: DataConfig) -> RagDataset:
    if cfg.format == "squad":
        return _load_squad_dataset(cfg)
    if cfg.format == "pubmedqa":
        examples, passages = load_pubmedqa(resolve_data_path(cfg.path))
        if cfg.eval_path:
            eval_examples, eval_passages = load_pubmedqa(
                resolve_data_path(cfg.eval_path, "data.eval_path")
            )
            train, held = examples, eval_examples
            known = {p.id for p in passages}
            passages += [p for p in eval_passages if p.id not in known]
        else:
            train, held = split_train_eval(examples, cfg.eval_fraction, cfg.split_seed)
        if cfg.answer == "long":
            for e in train + held:
                e.answer = e.long_answer or e.answer
    else:
        if not cfg.corpus:
            raise DataError("data.corpus is required for data.format 'qa_jsonl'")
        examples = load_qa_rows(resolve_data_path(cfg.path))
        passages = load_corpus_rows(resolve_data_path(cfg.corpus, "data.corpus"))
        check_gold_ids(examples, passages, cfg.path, cfg.corpus)
        if cfg.eval_path:
            held = load_qa_rows(resolve_data_path(cfg.eval_path, "data.eval_path"))
            check_gold_ids(held, passages, cfg.eval_path, cfg.corpus)
            train = examples
        else:
            train, held = split_train_eval(examples, cfg.eval_fraction, cfg.split_seed)
    if cfg.max_train:
        train = train[: cfg.max_train]
    if cfg.max_eval:
        held = held[: cfg.max_eval]
    return RagDataset(train=train, eval=held, passages=passages)


# --------------------------------------------------------------------------- partitioning


def eval_examples(cfg: ExperimentConfig, data: RagDataset) -> list[QAExample]:
    """The held-out questions evaluation uses (``eval.max_questions`` caps them)."""
    n = cfg.eval.max_questions
    return data.eval[:n] if n else data.eval


def _field_value(example: QAExample, name: str) -> str:
    if name == "label":
        return str(example.label or example.metadata.get("label", ""))
    return str(example.metadata.get(name, ""))


def partition_examples(
    examples: Sequence[QAExample],
    num_clients: int,
    kind: str = "iid",
    alpha: float = 0.5,
    field_name: str = "label",
    seed: int = 0,
) -> list[list[int]]:
    """Indices of ``examples`` per client.

    - ``iid``: a seeded shuffle split evenly.
    - ``dirichlet``: per value of ``field_name``, client shares ~ Dirichlet(alpha); small
      alpha gives skewed label/source mixes (Hsu et al. 2019). Every client gets at least
      one example.
    - ``field``: whole groups of ``field_name`` values (e.g. year, MeSH term) go to
      clients, largest group first to the least-loaded client, like hospitals that each
      hold their own topics.
    """
    n = len(examples)
    if num_clients > n:
        raise ValueError(f"cannot split {n} examples across {num_clients} clients")
    rng = np.random.default_rng(seed)
    if kind == "iid":
        order = rng.permutation(n)
        return [sorted(part.tolist()) for part in np.array_split(order, num_clients)]

    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        groups[_field_value(e, field_name)].append(i)
    if kind == "field":
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        least_loaded = [(0, c) for c in range(num_clients)]  # a heap of (size, client)
        for _, idx in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            size, target = heapq.heappop(least_loaded)
            parts[target].extend(idx)
            heapq.heappush(least_loaded, (size + len(idx), target))
        _fill_empty(parts, rng)
        return [sorted(p) for p in parts]
    if kind == "dirichlet":
        parts = [[] for _ in range(num_clients)]
        for _, idx in sorted(groups.items()):
            idx = rng.permutation(idx).tolist()
            shares = rng.dirichlet([alpha] * num_clients)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for c, chunk in enumerate(np.split(np.array(idx, dtype=int), cuts)):
                parts[c].extend(chunk.tolist())
        _fill_empty(parts, rng)
        return [sorted(p) for p in parts]
    raise ValueError(f"unknown partition type {kind!r}; allowed: iid, dirichlet, field")


def _fill_empty(parts: list[list[int]], rng: np.random.Generator) -> None:
    """Move one example from the largest client (the first one on ties) to each empty
    one, in client order (a client needs data). A heap of (-size, client) with stale
    entries skipped keeps this O(C log C) instead of a scan of all clients per empty one;
    the donors, and so the partitions, are the same as the scan's."""
    largest = [(-len(p), c) for c, p in enumerate(parts)]
    heapq.heapify(largest)
    for c, part in enumerate(parts):
        if part:
            continue
        while True:
            neg_size, donor = heapq.heappop(largest)
            if -neg_size == len(parts[donor]):
                break
        take = int(rng.integers(len(parts[donor])))
        parts[c].append(parts[donor].pop(take))
        heapq.heappush(largest, (-len(parts[donor]), donor))
        heapq.heappush(largest, (-1, c))
