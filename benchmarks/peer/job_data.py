"""The same data for both systems: the peer's own rows, passages and client split,
written as fedrag_ray ``qa_jsonl`` files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .job import DATA, N_EVAL, N_PASSAGES, SEED, load_peer_module


def build_data(work: Path, n_train: int, ks: list[int]) -> dict[str, Any]:
    """qa_jsonl files with the peer's rows, passages and (per K) client split."""
    from fedrag_ray.data import load_qa_rows, partition_examples

    peer = load_peer_module()
    rows, passages = peer.load_rows(DATA, "final_decision", n_train, N_PASSAGES)
    raw = json.loads(DATA.read_text())
    items = list(raw.items())
    # Same walk as load_rows, keeping the PubMed id (doc id) of every passage.
    corpus, seen = [], set()
    for pmid, item in items:
        for i, text in enumerate(item["CONTEXTS"]):
            if text not in seen and len(corpus) < N_PASSAGES:
                seen.add(text)
                corpus.append({"id": f"{pmid}:{i}", "text": text, "doc_id": pmid})
    assert [c["text"] for c in corpus] == passages, "passage selection differs from the peer"
    qa = []
    for (pmid, item), row in zip(items[:n_train], rows, strict=True):
        assert item["QUESTION"] == row["query"] and item["final_decision"] == row["response"]
        qa.append(_qa_row(pmid, item))
    held = [_qa_row(pmid, item) for pmid, item in items[n_train : n_train + N_EVAL]]
    docs = {c["doc_id"] for c in corpus}
    work.mkdir(parents=True, exist_ok=True)
    corpus_path = work / "corpus.jsonl"
    eval_path = work / f"eval-after{n_train}.jsonl"
    _write_jsonl(corpus_path, corpus)
    _write_jsonl(eval_path, held)
    train_paths, splits = {}, {}
    for k in ks:
        peer_parts = peer.iid_partitions(n_train, k, SEED)
        ours_parts = partition_examples([None] * n_train, k, "iid", seed=SEED)  # type: ignore[list-item]
        ordered: list[dict[str, Any] | None] = [None] * n_train
        for pp, op in zip(peer_parts, ours_parts, strict=True):
            assert len(pp) == len(op), "partition sizes differ"
            for pos, idx in zip(sorted(op), sorted(pp), strict=True):
                ordered[pos] = qa[idx]
        path = work / f"train-n{n_train}-k{k}.jsonl"
        _write_jsonl(path, ordered)
        # Check: what fedrag_ray will do with this file == what the peer does.
        loaded = load_qa_rows(path)
        ours = partition_examples(loaded, k, "iid", seed=SEED)
        same = [
            sorted(loaded[i].id for i in o) == sorted(qa[i]["id"] for i in p)
            for o, p in zip(ours, peer_parts, strict=True)
        ]
        assert all(same), f"client split differs at K={k}"
        train_paths[k] = str(path)
        splits[k] = {"partition_sizes": [len(p) for p in peer_parts], "identical_sets": True}
    return {
        "n_train": n_train,
        "train_paths": train_paths,
        "corpus_path": str(corpus_path),
        "eval_path": str(eval_path),
        "splits": splits,
        "n_passages": len(corpus),
        "n_docs_in_corpus": len(docs),
        "eval_gold_in_corpus": sum(r["gold_ids"][0] in docs for r in held),
        "eval_ids": [r["id"] for r in held],
    }


def _qa_row(pmid: str, item: dict[str, Any]) -> dict[str, Any]:
    answer = str(item["final_decision"])
    return {
        "id": pmid,
        "question": item["QUESTION"],
        "answer": answer,
        "label": answer,
        "gold_ids": [pmid],
    }


def _write_jsonl(path: Path, rows: list[Any]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
