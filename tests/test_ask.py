"""``fedrag-ray ask``: quiet, one store per corpus reused across runs, and
``--interactive`` answering several questions from one load with the same answers as
one-shot ``ask``; ``fedrag_ray.service.open_store`` never uses a store built from other
inputs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Does aspirin help the heart?", "What treats type 2 diabetes?"]
FACTS = [
    "Aspirin reduces the risk of heart attack in adults.",
    "Statins lower LDL cholesterol in the blood.",
    "Metformin is a first-line treatment for type 2 diabetes.",
    "Hand washing reduces infections in hospitals.",
]


def _config(tmp_path: Path) -> Path:
    corpus = [{"id": f"d{i}", "text": t} for i, t in enumerate(FACTS)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    qa = [{"question": f"fact {i}?", "answer": "yes", "gold_ids": [f"d{i}"]} for i in range(4)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    path = tmp_path / "ask.yaml"
    path.write_text(
        "name: ask\n"
        "data: {format: qa_jsonl, path: qa.jsonl, corpus: corpus.jsonl}\n"
        "generator: {model: tiny-random, max_length: 96}\n"
        "rag: {max_new_tokens: 6, generate_passages: 2}\n"
    )
    return path


def _ask(args: list[str], cache: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDRAG_RAY_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("FEDRAG_RAY_VERBOSE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "fedrag_ray.cli", "ask", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _json_docs(text: str) -> list[dict]:
    decoder, docs, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        doc, i = decoder.raw_decode(text, i)
        docs.append(doc)
    return docs


def test_ask_is_quiet_reuses_its_store_and_interactive_matches_one_shot(tmp_path):
    config = _config(tmp_path)
    cache = tmp_path / "cache"
    one = _ask([str(config), QUESTIONS[0]], cache)
    (first,) = _json_docs(one.stdout)
    assert first["sources"] and first["sources"][0]["id"] == "d0"
    for noise in ("Loading weights", "Warning", "warn(", "Traceback"):
        assert noise not in one.stderr, one.stderr
    stores = [p for p in (cache / "stores").iterdir() if p.name != "by-data"]
    assert len(stores) == 1  # the corpus was indexed once, into the cache
    manifest = stores[0] / "manifest.json"
    built = manifest.stat().st_mtime_ns

    lines = "\n".join(QUESTIONS) + "\nexit\nnever asked\n"
    inter = _ask([str(config), "--interactive"], cache, stdin=lines)
    answers = _json_docs(inter.stdout)
    assert len(answers) == 2  # 'exit' ended the loop
    assert answers[0] == first
    assert inter.stderr.count("answered in") == 2
    assert manifest.stat().st_mtime_ns == built  # reused, not rebuilt
    assert [p for p in (cache / "stores").iterdir() if p.name != "by-data"] == stores

    two = _ask([str(config), QUESTIONS[1]], cache)
    assert _json_docs(two.stdout) == [answers[1]]

    # EOF ends the loop too; a question given on the command line goes first
    eof = _ask([str(config), QUESTIONS[1], "--interactive"], cache, stdin=QUESTIONS[0])
    assert _json_docs(eof.stdout) == [answers[1], first]

    # the store is found again by the data files' fingerprint; an edited corpus is a new
    # fingerprint, so the next answer comes from a store of the new text
    facts = [f.replace("Aspirin", "Acetylsalicylic acid") for f in FACTS]
    corpus = [{"id": f"d{i}", "text": t} for i, t in enumerate(facts)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    edited = _json_docs(_ask([str(config), QUESTIONS[0]], cache).stdout)[0]
    assert edited["sources"][0]["text"].startswith("Acetylsalicylic acid")
    assert len([p for p in (cache / "stores").iterdir() if p.name != "by-data"]) == 2


def test_open_store_skips_a_run_store_built_from_other_passages(
    tmp_path, retriever, generator, small_corpus, monkeypatch
):
    from fedrag_ray.config import config_from_dict
    from fedrag_ray.rag import RAGSystem
    from fedrag_ray.service import open_store, store_cache_path

    monkeypatch.setenv("FEDRAG_RAY_CACHE", str(tmp_path / "cache"))
    _, passages = small_corpus
    cfg = config_from_dict({"generator": {"model": "tiny-random", "max_length": 64}})
    system = RAGSystem(cfg, retriever=retriever, generator=copy.deepcopy(generator))
    run = tmp_path / "run"
    stale = system.build_store(passages[:-1])  # one passage short: other inputs
    stale.save(run / "stores" / "global")
    where = open_store(system, passages, run)
    assert where == store_cache_path(cfg, passages)
    assert len(system.store) == len(passages)

    system.build_store(passages).save(run / "stores" / "global")
    system.store = None
    assert open_store(system, passages, run) == run / "stores" / "global"
    assert len(system.store) == len(passages)
