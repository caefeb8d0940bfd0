"""Every user error is caught before any model loads or Ray starts: exit status 2, one
line naming the field or file, no traceback, in seconds (``fedrag_ray.preflight``).

Each case runs the real CLI in a subprocess (imports, config loading and all), timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FEDRAG = [sys.executable, "-m", "fedrag_ray.cli"]
MAX_SECONDS = 10.0

TINY = """\
name: tiny
data: {format: qa_jsonl, path: qa.jsonl, corpus: corpus.jsonl, eval_fraction: 0.25}
generator: {model: tiny-random, max_length: 64}
eval: {generate: false}
"""
FEDERATED = TINY + "federation: {num_clients: 2, rounds: 1}\n"


def _rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A small valid qa_jsonl experiment (8 questions, 8 passages) to break one way."""
    _rows(tmp_path / "corpus.jsonl", [{"id": f"d{i}", "text": f"fact {i}"} for i in range(8)])
    qa = [{"question": f"q{i}?", "answer": "yes", "gold_ids": [f"d{i}"]} for i in range(8)]
    _rows(tmp_path / "qa.jsonl", qa)
    (tmp_path / "tiny.yaml").write_text(TINY)
    (tmp_path / "fed.yaml").write_text(FEDERATED)
    (tmp_path / "a_file").write_text("not a directory")
    return tmp_path


def _setup_gold_mismatch(w: Path) -> None:
    _rows(w / "qa.jsonl", [{"question": "q?", "answer": "yes", "gold_ids": ["doc-7"]}] * 4)


def _setup_bad_metadata(w: Path) -> None:
    _rows(w / "qa.jsonl", [{"question": "q?", "answer": "yes", "metadata": "note"}] * 4)


def _setup_bad_jsonl(w: Path) -> None:
    (w / "qa.jsonl").write_text('{"question": "q?", "answer": "yes"}\n{not json\n')


def _setup_resume_other_config(w: Path) -> None:
    ckpt = w / "run" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"version": 1, "round": 1, "config_hash": "0" * 16}))


def _setup_model_dir(w: Path) -> None:
    (w / "empty_model").mkdir()


def _setup_not_npz(w: Path) -> None:
    (w / "state.npz").write_text("not an archive")


def _setup_bad_yaml(w: Path) -> None:
    (w / "bad.yaml").write_text("train: [unclosed\n")


def _setup_list_yaml(w: Path) -> None:
    (w / "list.yaml").write_text("- a\n- b\n")


def _setup_run_without_state(w: Path) -> None:
    (w / "run").mkdir()
    (w / "run" / "results.json").write_text(json.dumps({"config": {"name": "x"}}))


# (id, argv (with {w} for the work dir), what the one line must name, optional setup)
CASES = [
    ("bundled-name", ["train", "no_such_config"], "no_such_config", None),
    ("config-file-missing", ["train", "{w}/missing.yaml"], "missing.yaml", None),
    ("config-not-yaml", ["train", "{w}/bad.yaml"], "bad.yaml", _setup_bad_yaml),
    ("config-not-mapping", ["train", "{w}/list.yaml"], "list.yaml", _setup_list_yaml),
    ("unknown-field", ["train", "{w}/tiny.yaml", "--set", "train.lrr=1"], "train.lrr", None),
    ("unknown-section", ["eval", "{w}/tiny.yaml", "--set", "trian.lr=1"], "trian", None),
    ("bad-enum", ["train", "{w}/tiny.yaml", "--set", "train.method=foo"], "train.method", None),
    ("out-of-range", ["train", "{w}/tiny.yaml", "--set", "train.lr=-1"], "train.lr", None),
    ("set-without-value", ["train", "{w}/tiny.yaml", "--set", "train.lr"], "--set", None),
    ("set-bad-yaml", ["train", "{w}/tiny.yaml", "--set", "train.lr=[1,"], "--set train.lr", None),
    ("set-into-value", ["train", "{w}/tiny.yaml", "--set", "train.lr.x=1"], "train.lr", None),
    (
        "generator-path",
        ["simulate", "{w}/fed.yaml", "--set", "generator.model=/nonexistent/model"],
        "generator.model",
        None,
    ),
    (
        "generator-hub-uncached",
        ["ask", "{w}/tiny.yaml", "q?", "--set", "generator.model=nobody/no-such-model"],
        "generator.model",
        None,
    ),
    (
        "generator-dir-no-config",
        ["train", "{w}/tiny.yaml", "--set", "generator.model={w}/empty_model"],
        "generator.model",
        _setup_model_dir,
    ),
    (
        "generator-plain-file",
        ["train", "{w}/tiny.yaml", "--set", "generator.model={w}/a_file"],
        "generator.model",
        None,
    ),
    (
        "retriever-path",
        ["index", "build", "{w}/tiny.yaml", "-o", "{w}/s", "--set", "retriever.model=./nope"],
        "retriever.model",
        None,
    ),
    (
        "data-path",
        ["train", "{w}/tiny.yaml", "--set", "data.path={w}/none.jsonl"],
        "data.path",
        None,
    ),
    (
        "data-corpus",
        ["eval", "{w}/tiny.yaml", "--set", "data.corpus={w}/none.jsonl"],
        "data.corpus",
        None,
    ),
    (
        "data-eval-path",
        ["train", "{w}/tiny.yaml", "--set", "data.eval_path={w}/none.jsonl"],
        "data.eval_path",
        None,
    ),
    ("metadata-not-object", ["train", "{w}/tiny.yaml"], "'metadata'", _setup_bad_metadata),
    ("gold-ids-match-no-doc", ["train", "{w}/tiny.yaml"], "gold_ids", _setup_gold_mismatch),
    ("malformed-jsonl", ["train", "{w}/tiny.yaml"], "qa.jsonl: line 2", _setup_bad_jsonl),
    (
        "more-clients-than-examples",
        ["simulate", "{w}/fed.yaml", "--set", "federation.num_clients=400"],
        "federation.num_clients",
        None,
    ),
    (
        "store-root-under-a-file",
        ["train", "{w}/tiny.yaml", "--set", "knowledge_store.path={w}/a_file/store"],
        "knowledge_store.path",
        None,
    ),
    (
        "shard-dir-not-writable",
        ["simulate", "{w}/fed.yaml", "--set", "federation.shard_dir=/proc/fedrag/shards"],
        "federation.shard_dir",
        None,
    ),
    ("output-under-a-file", ["train", "{w}/tiny.yaml", "-o", "{w}/a_file/out"], "--output", None),
    (
        "resume-other-config",
        ["simulate", "{w}/fed.yaml", "--resume", "{w}/run"],
        "--resume",
        _setup_resume_other_config,
    ),
    ("resume-no-checkpoint", ["simulate", "{w}/fed.yaml", "--resume", "{w}"], "--resume", None),
    ("state-missing", ["eval", "{w}/tiny.yaml", "--state", "{w}/none.npz"], "--state", None),
    (
        "state-not-npz",
        ["ask", "{w}/tiny.yaml", "q?", "--state", "{w}/state.npz"],
        "--state",
        _setup_not_npz,
    ),
    (
        "init-from-missing",
        ["train", "{w}/tiny.yaml", "--set", "train.init_from={w}/no_run"],
        "train.init_from",
        None,
    ),
    ("simulate-centralized-config", ["simulate", "{w}/tiny.yaml"], "federation", None),
    (
        "sample-exceeds-clients",
        ["simulate", "{w}/fed.yaml", "--set", "federation.clients_per_round=3"],
        "clients_per_round",
        None,
    ),
    ("ask-without-question", ["ask", "{w}/tiny.yaml"], "QUESTION", None),
    ("serve-missing-run", ["serve", "{w}/no_run"], "RUN_DIR", None),
    (
        "serve-run-without-state",
        ["serve", "{w}/run"],
        "trainable_state.npz",
        _setup_run_without_state,
    ),
    ("tune-without-tune-section", ["tune", "{w}/tiny.yaml"], "tune", None),
    ("export-missing-run", ["export", "{w}/no_run", "-o", "{w}/exp"], "RUN_DIR", None),
    (
        "privacy-without-noise",
        ["simulate", "{w}/fed.yaml", "--set", "federation.privacy.mode=central"],
        "federation.privacy",
        None,
    ),
]


def _run(
    argv: list[str], extra_env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    env["COLUMNS"] = "80"  # a narrow terminal must not wrap the one line
    t = time.perf_counter()
    proc = subprocess.run(
        [*FEDRAG, *argv], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    return proc, time.perf_counter() - t


def test_table_has_at_least_25_cases() -> None:
    assert len(CASES) >= 25
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv,names,setup", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_in_seconds(work: Path, argv, names, setup) -> None:
    if setup is not None:
        setup(work)
    proc, seconds = _run([a.replace("{w}", str(work)) for a in argv])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert names in lines[0], lines[0]
    assert proc.stdout == ""
    assert seconds < MAX_SECONDS, f"{seconds:.1f}s"


def test_unexpected_error_prints_one_traceback_without_locals(work: Path) -> None:
    """A failure that is no known user error (here: a corrupt file in the model cache)
    still shows where it happened, once, but not the values of local variables: with
    rich's show_locals they would print whatever the frames held, user data included."""
    from fedrag_ray.config import TinyGeneratorSpec
    from fedrag_ray.models import tiny_generator_dir

    secret = "patient-4711-secret-note"
    cache = work / "cache"
    env_cache = {"FEDRAG_RAY_CACHE": str(cache)}
    model_dir = tiny_generator_dir(TinyGeneratorSpec(), 0)  # under the test session's cache
    broken = cache / model_dir.relative_to(model_dir.parents[1])
    broken.mkdir(parents=True)
    (broken / "config.json").write_text('{"model_type": "llama", "note": "' + secret)
    proc, _ = _run(["ask", str(work / "tiny.yaml"), "q?"], env_cache)
    out = proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert out.count("Traceback") == 1, out[-6000:]
    assert secret not in out
