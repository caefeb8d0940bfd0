"""One fedrag_ray run of the job, measured from inside the subprocess that runs it
(``peer_fedrag.py --worker SPEC --result OUT``): ``run_federated`` with Ray started in
this process, memory and CPU of the whole tree sampled by ``harness.TreeSampler``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from harness import TreeSampler

from . import job
from .job import ENV, GIB


def worker(spec_path: Path, result_path: Path) -> None:
    os.environ.update(ENV)
    import psutil

    t_proc = psutil.Process().create_time()
    load_start = os.getloadavg()[0]
    sampler = TreeSampler()  # this process's tree: driver, Ray's processes, actors
    sampler.start()
    import numpy as np

    from fedrag_ray.config import config_from_dict
    from fedrag_ray.federated.simulation import run_federated

    spec = json.loads(spec_path.read_text())
    job.set_schedule(spec["rounds"], spec["local_steps"])
    cfg = config_from_dict(job.make_config(spec), source=spec["name"])
    phases: list[tuple[float, str]] = []
    rounds_seen: list[dict[str, Any]] = []

    def on_phase(msg: str) -> None:
        phases.append((time.time(), msg))

    def on_round(row: dict[str, Any]) -> None:
        rounds_seen.append({"round": row["round"], "t": time.time(), "cpu": sampler.cpu_seconds()})

    t_call = time.time()
    out = run_federated(
        cfg, output=spec["run_dir"], on_round=on_round, on_phase=on_phase, num_cpus=2
    )
    t_done = time.time()
    sampler.stop()
    cpu_total = sampler.cpu.total()

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
    round_cpu = [
        cpu_marks[r] - cpu_marks[r - 1] for r in range(1, job.ROUNDS + 1) if r in cpu_marks
    ]
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
