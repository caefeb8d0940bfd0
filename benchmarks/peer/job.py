"""The job both systems run (issue 10's side by side) and fedrag_ray's config for it.

``ROUNDS`` and ``LOCAL_STEPS`` are set once per process by ``set_schedule`` (``--rounds``,
``--local-steps``): read them as ``job.ROUNDS``, not by ``from job import``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from harness import OFFLINE_ENV, PUBMEDQA, SCRATCH

PEER_DIR = Path(__file__).resolve().parent
BENCHMARKS = PEER_DIR.parent
ENTRY = BENCHMARKS / "peer_fedrag.py"  # also the worker's script (``--worker SPEC``)
PEER_PY = BENCHMARKS / ".peer-venv" / "bin" / "python"
PEER_RUNNER = PEER_DIR / "run_peer.py"
PEER_SETUP = PEER_DIR / "setup_peer_venv.sh"  # reads PEER_DIR / requirements-peer.txt
DATA = PUBMEDQA
WORK = SCRATCH / "peer_fedrag"
GIB = 1024**3
MB = 1e6

# The job, shared by both systems.
ROUNDS, LOCAL_STEPS, BATCH, LR, TOP_K = 3, 5, 4, 1e-4, 2
N_TRAIN, N_PASSAGES, N_EVAL, SCALE_N_TRAIN = 64, 500, 16, 128
METHODS, KS = ("lsr", "ralt"), (2, 4)
SEED = 0
GEN_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

TARGETS = {"round_s": 3.0, "memory_k4": 4.0, "bytes": 50.0}  # at K = 4 (issue 10)
# Peer's summed PSS per extra client and fixed part, measured in benchmarks/peer/README.md.
PEER_README_PSS_SLOPE = {"lsr": (1.76, 1.9), "ralt": (1.49, 1.7)}
RAM_BUDGET_GIB = 22.0  # of 24 GiB: what a job may use next to the OS

ENV = {**OFFLINE_ENV, "RAY_DEDUP_LOGS": "0"}


def load_peer_module() -> Any:
    """run_peer.py's module level is stdlib (+ the harness) only: its data selection and
    split are used as they are, so both systems see exactly the same questions, passages
    and clients."""
    spec = importlib.util.spec_from_file_location("run_peer", PEER_RUNNER)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def set_schedule(rounds: int, local_steps: int) -> None:
    """``--rounds`` / ``--local-steps``: both systems, this process and its workers."""
    global ROUNDS, LOCAL_STEPS
    ROUNDS, LOCAL_STEPS = rounds, local_steps


def make_config(spec: dict[str, Any]) -> dict[str, Any]:
    method, k = spec["method"], spec["clients"]
    return {
        "name": spec["name"],
        "seed": SEED,
        "data": {
            "format": "qa_jsonl",
            "path": spec["train_path"],
            "corpus": spec["corpus_path"],
            "eval_path": spec["eval_path"],
            "answer": "label",
        },
        "retriever": {"model": "default", "train": spec["retriever_train"]},
        "generator": {
            "model": spec["generator"],
            "lora": {"r": 8, "alpha": 16, "target_modules": GEN_LORA_TARGETS},
        },
        "rag": {"top_k": TOP_K},
        "train": {
            "method": method,
            "batch_size": BATCH,
            "lr": LR,
            "retriever_lr": LR,
            "lsr": {"k": TOP_K},
            "ralt": {"k": TOP_K},
        },
        "eval": {"generate": False, "max_questions": N_EVAL},
        "federation": {
            "num_clients": k,
            "clients_per_round": k,
            "rounds": ROUNDS,
            "local_steps": LOCAL_STEPS,
            "eval_every": ROUNDS,
            "client_resources": {"num_cpus": 1},
        },
    }
