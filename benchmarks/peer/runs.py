"""One run of either system, each in its own process group so that memory and Ray
state never leak from one run into the next, and a timeout kills only what it started."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import REPO, git

from . import job
from .job import (
    BATCH,
    DATA,
    ENTRY,
    ENV,
    LR,
    N_PASSAGES,
    N_TRAIN,
    PEER_PY,
    PEER_RUNNER,
    SEED,
    TOP_K,
    WORK,
)


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    t0 = time.time()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ENV, "FEDRAG_RAY_CACHE": str(WORK / "cache")},
            cwd=REPO,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what we started
            proc.wait()
            rc = -9
    return rc, time.time() - t0


def run_ours(
    name: str,
    method: str,
    k: int,
    data: dict[str, Any],
    generator: Path,
    retriever_train: str,
    timeout: float,
) -> dict[str, Any]:
    run_dir = WORK / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": name,
        "method": method,
        "clients": k,
        "retriever_train": retriever_train,
        "n_train": data["n_train"],
        "train_path": data["train_paths"][k],
        "corpus_path": data["corpus_path"],
        "eval_path": data["eval_path"],
        "generator": str(generator),
        "run_dir": str(run_dir / "run"),
        "rounds": job.ROUNDS,
        "local_steps": job.LOCAL_STEPS,
    }
    spec_path, result_path = run_dir / "spec.json", run_dir / "result.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    code = code_state()
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(ENTRY), "--worker", str(spec_path)]
    rc, wall = _run(cmd + ["--result", str(result_path)], run_dir / "worker.log", timeout)
    if rc == 0 and result_path.exists():
        res = json.loads(result_path.read_text())
    else:
        tail = (run_dir / "worker.log").read_text(errors="replace").splitlines()[-30:]
        res = {"system": "fedrag_ray", "name": name, "exit_status": 1, "rc": rc, "log_tail": tail}
    res["wall_s"], res["fedrag_ray_code"] = wall, code
    return res


def run_peer(
    name: str, method: str, k: int, generator: Path, timeout: float, adapter: Path | None = None
) -> dict[str, Any]:
    run_dir = WORK / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "peer.json"
    out.unlink(missing_ok=True)
    cmd = [
        str(PEER_PY),
        str(PEER_RUNNER),
        "--method", method,
        "--clients", str(k),
        "--rounds", str(job.ROUNDS),
        "--local-steps", str(job.LOCAL_STEPS),
        "--batch-size", str(BATCH),
        "--lr", str(LR),
        "--top-k", str(TOP_K),
        "--generator", str(generator),
        "--data", str(DATA),
        "--answer-field", "final_decision",
        "--n-train", str(N_TRAIN),
        "--n-passages", str(N_PASSAGES),
        "--seed", str(SEED),
        "--workdir", str(run_dir / "work"),
        "--out", str(out),
    ]  # fmt: skip
    if adapter is not None and method == "ralt":
        cmd += ["--generator-adapter", str(adapter)]
    rc, wall = _run(cmd, run_dir / "launcher.log", timeout + 120)
    res = json.loads(out.read_text()) if out.exists() else {"exit_status": 1, "rc": rc}
    res.pop("clients_detail", None)  # per-fit detail stays in the run dir
    res.pop("server_rounds_raw", None)
    res.pop("notes", None)  # the peer's defect list: once, at the top of the JSON
    res["name"], res["wall_s"] = name, wall
    return res


def code_state() -> str:
    """HEAD plus a hash of fedrag_ray's source as it is on disk now (the editable install
    imports the working tree, which other work may be editing during a long run)."""
    h = hashlib.sha256()
    for path in sorted((REPO / "fedrag_ray").rglob("*.py")):
        h.update(path.relative_to(REPO).as_posix().encode())
        h.update(path.read_bytes())
    return f"{git('rev-parse', '--short', 'HEAD') or ''}+src:{h.hexdigest()[:12]}"
