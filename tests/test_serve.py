"""``fedrag-ray serve RUN_DIR`` for real: Ray Serve on loopback, asked over HTTP, compared
with ``RAGSystem.answer`` on the same state, bad bodies refused with 4xx, stopped cleanly
by SIGINT (the command exits 0 and the port closes)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fedrag_ray.serve import BadRequest, parse_question

ROOT = Path(__file__).resolve().parents[1]
FACTS = [
    "Aspirin reduces the risk of heart attack in adults.",
    "Statins lower LDL cholesterol in the blood.",
    "Vitamin D supports bone health in older people.",
    "Regular exercise improves sleep quality.",
    "Smoking increases the risk of lung cancer.",
    "Metformin is a first-line treatment for type 2 diabetes.",
    "Hand washing reduces infections in hospitals.",
    "Green tea contains antioxidants called catechins.",
]
QUESTIONS = ["Does aspirin help the heart?", "What treats type 2 diabetes?"]
MAX_CHARS = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: bytes | None = None, method: str = "GET") -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def run_dir(tmp_path: Path):
    """A run directory as train / simulate leave it: results.json (config) and a
    trainable_state.npz that differs from the initial LoRA (so loading it matters)."""
    from fedrag_ray.config import config_from_dict
    from fedrag_ray.rag import RAGSystem

    corpus = [{"id": f"d{i}", "text": t} for i, t in enumerate(FACTS)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    qa = [{"question": f"fact {i}?", "answer": "yes", "gold_ids": [f"d{i}"]} for i in range(8)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    cfg = config_from_dict(
        {
            "name": "served",
            "data": {
                "format": "qa_jsonl",
                "path": str(tmp_path / "qa.jsonl"),
                "corpus": str(tmp_path / "corpus.jsonl"),
            },
            "generator": {"model": "tiny-random", "max_length": 96},
            "rag": {"max_new_tokens": 8, "generate_passages": 2},
            "train": {"method": "ralt"},
            "serve": {"port": _free_port(), "max_question_chars": MAX_CHARS},
        }
    )
    system = RAGSystem(cfg)
    rng = np.random.default_rng(0)
    state = {
        k: v + 0.05 * rng.standard_normal(v.shape).astype(v.dtype)
        for k, v in system.trainable_state().items()
    }
    run = tmp_path / "run"
    run.mkdir()
    np.savez(run / "trainable_state.npz", **state)
    (run / "results.json").write_text(json.dumps({"config": cfg.model_dump(mode="json")}))
    system.load_trainable_state(state)
    system.build_store([p for p in _passages(tmp_path)])
    return run, cfg, system


def _passages(tmp_path: Path):
    from fedrag_ray.data import load_corpus_rows

    return load_corpus_rows(tmp_path / "corpus.jsonl")


def test_parse_question_refuses_bad_bodies_with_the_right_status():
    assert parse_question(b'{"question": "why?"}', 10) == "why?"
    for body, status in [
        (b"{not json", 400),
        (b"\xff\xfe", 400),
        (b"", 400),
        (b'["why?"]', 400),
        (b"{}", 422),
        (b'{"question": 3}', 422),
        (b'{"question": "   "}', 422),
        (b'{"question": "' + b"x" * 11 + b'"}', 413),
    ]:
        with pytest.raises(BadRequest) as exc:
            parse_question(body, 10)
        assert exc.value.status == status, body


@pytest.mark.timeout(600)
def test_serve_answers_over_http_like_rag_system_and_stops_cleanly(run_dir, tmp_path):
    run, cfg, system = run_dir
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedrag_ray.cli", "serve", str(run)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{cfg.serve.port}"
    try:
        deadline = time.monotonic() + 400
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                status, health = _request(f"{url}/health")
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(1.0)
        assert health["status"] == "ok" and health["name"] == "served"

        for question in QUESTIONS:
            status, got = _request(
                f"{url}/ask", json.dumps({"question": question}).encode(), "POST"
            )
            assert status == 200, got
            want = system.answer(question)
            assert got["answer"] == want.answer
            assert [s["id"] for s in got["sources"]] == [p.id for p in want.passages]
            np.testing.assert_allclose(
                [s["score"] for s in got["sources"]], want.scores, rtol=1e-5, atol=1e-6
            )

        bad = [
            (b"{not json", 400),
            (b'{"question": ""}', 422),
            (b'{"text": "why?"}', 422),
            (json.dumps({"question": "x" * (MAX_CHARS + 1)}).encode(), 413),
        ]
        for body, want_status in bad:
            status, got = _request(f"{url}/ask", body, "POST")
            assert status == want_status, (body[:40], got)
            assert "question" in got["error"] or "JSON" in got["error"]
        assert _request(f"{url}/ask")[0] == 405
        assert _request(f"{url}/nowhere")[0] == 404
        assert _request(f"{url}/health")[1]["answered"] == len(QUESTIONS)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = (tmp_path / "serve.log").read_text()
    assert rc == 0, output[-4000:]
    assert "stopped" in output and "Traceback" not in output
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _request(f"{url}/health")
