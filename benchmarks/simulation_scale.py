"""Simulation scale benchmark: 10^3..10^5 registered virtual clients, 10..1,000 per round,
fedrag_ray's engine next to Flower 1.41's stock Ray backend, in one run.

    python benchmarks/simulation_scale.py [--registered 1000 10000 100000]
        [--per-round 10 100 1000] [--rounds 3] [--tiny 1000:10 100000:100 100000:1000]
        [--stock-limit 180] [--limit 900] [--out benchmarks/results]

What runs: ``run_federated`` (Flower's simulation engine, ``run_simulation``) with the
tiny-random generator + LoRA, method ``ralt``, one CPU per client actor and Ray started
embedded with the machine's cores (2 here: 2 actors). Every (registered, per round) pair
runs with ``federation.client_step: noop`` (a client replies with the arrays it got: no
model work, so a round's time is the engine's own) on fedrag_ray's backend and on
Flower's stock ``RayBackend`` + message poller (``run_federated(stock_backend=True)``;
the ServerApp, ClientApp and sampling are the same). Stock runs have a time limit
(``--stock-limit`` s each, the whole subprocess); a pair is skipped, and reported so, when
a pair with no more registered and no more per-round clients already exceeded it.
``--tiny`` pairs run again with the real tiny local step (``local_steps`` 2 at batch
size 2, ``ralt.k`` 2) on fedrag_ray's backend: rounds vs ideal.

Data: PubMedQA PQA-L questions (``pubmedqa/pqal_trainval.json`` in the data directory:
``$FEDRAG_RAY_DATA``, or ``../shared/data`` beside the repository; ``fedrag-ray data
download pubmedqa`` fetches it) repeated as "(variant k)" into one ``qa_jsonl`` set of at
least max(registered) questions, used by every run (so memory differences between runs are
the engine's, not the data's); 20 PubMed ids are held out for evaluation.
Server-side evaluation (4 questions, no generation) runs after the last round only.

Measured per run (each in its own subprocess, so memory is its own):
  * setup_s       -- partition_s (every client's question indices, on the driver) +
                     nodes_s (until the engine has registered its nodes and the server
                     has the partition <-> node mapping; Flower registers them itself).
  * memory        -- peak RSS of the driver, and of the whole process tree (driver, Ray
                     GCS/raylet/workers, client actors), sampled every 0.2 s by a separate
                     process (not a thread: it would take the driver's GIL).
                     Growth per registered client: least-squares slope over registered
                     of the total peak, per per-round count; the worst is judged.
  * round_s       -- the server's training part of a round (sample, configure,
                     send/receive, aggregate), rounds 2..R (round 1 includes the actors'
                     one-off start); ideal_s = sum of the clients' train-seconds / actors;
                     engine_ms = (round_s - ideal_s) / tasks: the engine's cost per client
                     task. cpu_ms = CPU seconds of the whole process tree in round 2 per
                     task (what a round costs regardless of other jobs' load).

Targets (this 2-core machine): (a) 10^5 registered with 1,000 per round completes 3
rounds; (b) setup <= 60 s at 10^5; (c) memory growth <= 10 KiB per registered client;
(d) engine cost <= 5 ms per client task at 1,000 per round; (e) rounds <= 1.2 x ideal
with the real tiny step (ratio of totals over rounds 2..R).

The machine may be shared and noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import (
    PUBMEDQA,
    REPO,
    RESULTS,
    SubprocessSampler,
    offline_env,
    process_tree,
    write_result,
)

MIB, KIB = 2**20, 2**10
HELD_OUT_DOCS = 20  # PubMed ids kept out of training: the evaluation questions
EVAL_QUESTIONS = 4
TARGETS = {
    "setup_s_at_largest": 60.0,
    "kib_per_registered_client": 10.0,
    "engine_ms_per_task_at_1000": 5.0,
    "tiny_round_over_ideal": 1.2,
}


# --------------------------------------------------------------------------- data


def build_data(work: Path, min_train: int) -> dict[str, Any]:
    """qa_jsonl train/eval files and a corpus from PubMedQA, train questions repeated
    as "(variant k)" until there are at least ``min_train``."""
    if not PUBMEDQA.exists():
        raise SystemExit(
            f"{PUBMEDQA} not found (the data directory is $FEDRAG_RAY_DATA or ../shared/data "
            "beside the repository): run `fedrag-ray data download pubmedqa`"
        )
    src = PUBMEDQA
    raw = json.loads(src.read_text())
    pmids = sorted(raw)
    eval_ids, train_ids = pmids[:HELD_OUT_DOCS], pmids[HELD_OUT_DOCS:]
    variants = -(-min_train // len(train_ids))
    data_dir = work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)

    def row(pmid: str, suffix: str) -> dict[str, Any]:
        label = raw[pmid]["final_decision"].strip().lower()
        return {
            "id": f"{pmid}{suffix.replace(' ', '-')}",
            "question": raw[pmid]["QUESTION"] + suffix,
            "answer": label,
            "label": label,
            "gold_ids": [pmid],
        }

    with open(data_dir / "train.jsonl", "w") as f:
        for k in range(variants):
            for pmid in train_ids:
                f.write(json.dumps(row(pmid, f" (variant {k})" if k else "")) + "\n")
    with open(data_dir / "eval.jsonl", "w") as f:
        for pmid in eval_ids:
            f.write(json.dumps(row(pmid, "")) + "\n")
    with open(data_dir / "corpus.jsonl", "w") as f:
        for pmid in pmids:
            for i, text in enumerate(raw[pmid]["CONTEXTS"]):
                f.write(json.dumps({"id": f"{pmid}:{i}", "text": text, "doc_id": pmid}) + "\n")
    return {
        "source": str(src),
        "train_questions": len(train_ids) * variants,
        "variants_per_question": variants,
        "eval_questions": len(eval_ids),
        "train": str(data_dir / "train.jsonl"),
        "eval": str(data_dir / "eval.jsonl"),
        "corpus": str(data_dir / "corpus.jsonl"),
    }


# --profiles: three client tiers on the simulated clock (federated/clock.py), to check
# that the engine's cost per client task stays as it was with the clock computed
PROFILES = [
    {"name": "fast", "share": 0.45, "speed": 1.0, "downlink_mbps": 100, "uplink_mbps": 20},
    {"name": "medium", "share": 0.45, "speed": 0.3, "downlink_mbps": 20, "uplink_mbps": 5},
    {"name": "slow", "share": 0.10, "speed": 0.05, "downlink_mbps": 5, "uplink_mbps": 1},
]


def make_config(
    data: dict[str, Any],
    registered: int,
    per_round: int,
    rounds: int,
    step: str,
    shard_dir: str,
    profiles: bool = False,
) -> dict[str, Any]:
    return {
        "name": f"scale-{registered}-{per_round}-{step}",
        "seed": 0,
        "data": {
            "format": "qa_jsonl",
            "path": data["train"],
            "eval_path": data["eval"],
            "corpus": data["corpus"],
            "max_eval": EVAL_QUESTIONS,
        },
        "retriever": {"model": "default", "train": "none"},
        "generator": {"model": "tiny-random", "lora": {"r": 8, "alpha": 16}},
        "rag": {"top_k": 2},
        "train": {"method": "ralt", "batch_size": 2, "lr": 1e-3, "ralt": {"k": 2}},
        "eval": {"generate": False, "max_questions": EVAL_QUESTIONS, "k_values": [1, 5]},
        "federation": {
            "num_clients": registered,
            "clients_per_round": per_round,
            "rounds": rounds,
            "local_steps": 2,
            "client_step": "noop" if step == "noop" else "train",
            "strategy": {"name": "fedavg"},
            "partition": {"type": "iid"},
            "knowledge": "global",
            "client_resources": {"num_cpus": 1},
            "eval_every": rounds,  # evaluate after the last round only
            "shard_dir": shard_dir,
            "clients": {"profiles": PROFILES if profiles else []},
        },
    }


# --------------------------------------------------------------------------- worker


def worker(spec_path: Path) -> None:
    """One federated simulation from a spec file; its figures as JSON."""
    from fedrag_ray.config import config_from_dict
    from fedrag_ray.federated.simulation import run_federated

    spec = json.loads(spec_path.read_text())
    cfg = config_from_dict(spec["config"])
    t0 = time.perf_counter()
    cpu_at_round: dict[int, float] = {}

    def on_round(row: dict[str, Any]) -> None:
        cpu_at_round[row["round"]] = rss.cpu_seconds()
        print(
            f"[{spec['label']}] {time.perf_counter() - t0:7.1f}s round {row['round']} "
            f"({row.get('round_seconds', row['seconds']):.2f}s)",
            flush=True,
        )

    # peak RSS of the driver and its tree every 0.2 s, from a helper process (a thread
    # here would take the driver's GIL from the engine it measures)
    rss = SubprocessSampler(interval=0.2, relist_s=2.0)
    with rss:
        summary = run_federated(
            cfg,
            output=spec["run_dir"],
            on_round=on_round,
            num_cpus=spec["num_cpus"],
            stock_backend=spec["backend"] == "flower-stock",
        )
    out = {
        "timings": summary["timings"],
        "num_actors": summary["num_actors"],
        "failures": summary["failures"],
        "rounds": [
            {
                "round": h["round"],
                "sampled": h["sampled"],
                "succeeded": h["succeeded"],
                "round_s": h["round_seconds"],
                "compute_s": h["client_compute_seconds"],
            }
            for h in summary["history"]
            if h["round"] > 0
        ],
        "peak_rss_bytes": rss.peak_rss,
        "driver_peak_rss_bytes": rss.peak_root,
        # round 2 alone: after the actors' start (round 1), before the last round's eval
        "round2_cpu_s": cpu_at_round[2] - cpu_at_round[1] if 2 in cpu_at_round else None,
        "wall_s": time.perf_counter() - t0,
    }
    Path(spec["result"]).write_text(json.dumps(out))


def prepare(spec_path: Path) -> None:
    """Embed the corpus once into the store all runs share."""
    from fedrag_ray.centralized import prepare_store
    from fedrag_ray.config import config_from_dict
    from fedrag_ray.data import load_dataset_from_config
    from fedrag_ray.federated.client_app import store_dir
    from fedrag_ray.rag import RAGSystem
    from fedrag_ray.runtime import configure_process

    configure_process()
    spec = json.loads(spec_path.read_text())
    cfg = config_from_dict(spec["config"])
    t = time.perf_counter()
    if not (store_dir(spec["shard_dir"], None) / "manifest.json").exists():
        store = prepare_store(RAGSystem(cfg), load_dataset_from_config(cfg.data))
        store.save(store_dir(spec["shard_dir"], None))
    Path(spec["result"]).write_text(json.dumps({"index_seconds": time.perf_counter() - t}))


# --------------------------------------------------------------------------- driver


def run_sub(mode: str, spec: dict[str, Any], work: Path, limit: float) -> dict[str, Any]:
    """The worker in a subprocess; past ``limit`` seconds it and every process it started
    (Ray's included) are killed."""
    spec_path = work / f"{spec['label']}.spec.json"
    spec["result"] = str(work / f"{spec['label']}.result.json")
    spec_path.write_text(json.dumps(spec))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, f"--{mode}", str(spec_path)], cwd=REPO)
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        import psutil

        tree = process_tree(proc.pid)
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
        return {"error": f"did not finish within {limit:g} s", "timed_out": True}
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not Path(spec["result"]).exists():
        return {"error": f"exit code {proc.returncode}", "wall_s": wall}
    return json.loads(Path(spec["result"]).read_text())


def figures(key: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    if "error" in res:
        return {**key, "completed": False, **res}
    rounds = res["rounds"]
    actors = res["num_actors"]
    steady = rounds[1:] or rounds
    round_s = sum(r["round_s"] for r in steady)
    ideal_s = sum(r["compute_s"] for r in steady) / actors
    tasks = sum(r["sampled"] for r in steady)
    t = res["timings"]
    return {
        **key,
        "completed": res["failures"] == 0 and len(rounds) == key["rounds"],
        "num_actors": actors,
        "partition_s": t["partition_s"],
        "nodes_s": t["discovery_s"],
        "setup_s": t["partition_s"] + t["discovery_s"],
        "prepare_s": t["prepare_s"],
        "round1_s": rounds[0]["round_s"],
        "round_s_steady": round_s / len(steady),
        "ideal_s_steady": ideal_s / len(steady),
        "round_over_ideal": round_s / ideal_s if ideal_s > 0 else None,
        "engine_ms_per_task": 1000 * (round_s - ideal_s) / tasks,
        "round2_cpu_ms_per_task": None
        if res.get("round2_cpu_s") is None or len(rounds) < 2
        else 1000 * res["round2_cpu_s"] / rounds[1]["sampled"],
        "peak_rss_bytes": res["peak_rss_bytes"],
        "driver_peak_rss_bytes": res["driver_peak_rss_bytes"],
        "wall_s": res["wall_s"],
        "rounds_detail": rounds,
    }


def slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def at_most(
    worst: float | None, limit: float, keys: tuple[str, str], **detail: Any
) -> dict[str, Any]:
    """A lower-is-better target's verdict: ``detail``, the worst measured value and the
    limit (under ``keys``), and whether it is met."""
    met = worst is not None and worst <= limit
    return {**detail, keys[0]: worst, keys[1]: limit, "met": met}


def verdicts(runs: list[dict[str, Any]], largest: int) -> dict[str, Any]:
    """Judged on fedrag_ray's runs; the stock runs are the baseline."""
    ours = [r for r in runs if r["backend"] == "fedrag_ray"]
    noop = [r for r in ours if r["step"] == "noop"]
    out: dict[str, Any] = {}
    big = [r for r in ours if r["registered"] == largest and r["per_round"] == 1000]
    out["a_largest_completes"] = {
        "runs": {r["step"]: bool(r.get("completed")) for r in big},
        "met": bool(big) and all(r.get("completed") for r in big),
    }
    at_largest = [r for r in noop if r["registered"] == largest and r.get("completed")]
    worst = max((r["setup_s"] for r in at_largest), default=None)
    limit = TARGETS["setup_s_at_largest"]
    out["b_setup"] = at_most(worst, limit, ("worst_setup_s", "limit_s"), registered=largest)
    slopes: dict[str, dict[str, float]] = {}
    for per_round in sorted({r["per_round"] for r in noop}):
        pts = [r for r in noop if r["per_round"] == per_round and r.get("completed")]
        if len({r["registered"] for r in pts}) >= 2:
            slopes[str(per_round)] = {
                "total_kib_per_client": slope(
                    [(r["registered"], r["peak_rss_bytes"] / KIB) for r in pts]
                ),
                "driver_kib_per_client": slope(
                    [(r["registered"], r["driver_peak_rss_bytes"] / KIB) for r in pts]
                ),
            }
    worst_slope = max((s["total_kib_per_client"] for s in slopes.values()), default=None)
    limit = TARGETS["kib_per_registered_client"]
    out["c_memory_growth"] = at_most(
        worst_slope, limit, ("worst_total_kib_per_client", "limit_kib"), per_per_round=slopes
    )
    at_1000 = [r for r in noop if r["per_round"] == 1000 and r.get("completed")]
    worst = max((r["engine_ms_per_task"] for r in at_1000), default=None)
    limit = TARGETS["engine_ms_per_task_at_1000"]
    per_registered = {str(r["registered"]): r["engine_ms_per_task"] for r in at_1000}
    out["d_engine_cost"] = at_most(
        worst, limit, ("worst_ms", "limit_ms"), per_registered=per_registered
    )
    tiny = [r for r in ours if r["step"] == "tiny" and r.get("completed")]
    worst = max((r["round_over_ideal"] for r in tiny), default=None)
    limit = TARGETS["tiny_round_over_ideal"]
    per_pair = {f"{r['registered']}x{r['per_round']}": r["round_over_ideal"] for r in tiny}
    out["e_tiny_round_vs_ideal"] = at_most(worst, limit, ("worst", "limit"), per_pair=per_pair)
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    from harness.plots import figure, save, zero_based

    fig, axes = figure(3, size=(15, 4.2))
    panels = (
        ("engine_ms_per_task", "engine ms per client task (noop step)", 1.0, True),
        ("setup_s", "setup s (partition + node mapping)", 1.0, False),
        ("peak_rss_bytes", "peak RSS GiB, whole process tree", 1 / 2**30, False),
    )
    per_rounds = sorted({r["per_round"] for r in runs})
    for ax, (field, title, scale, log_y) in zip(axes, panels, strict=True):
        for i, per_round in enumerate(per_rounds):
            for backend, ls, marker in (("fedrag_ray", "-", "o"), ("flower-stock", "--", "x")):
                rs = sorted(
                    (
                        r
                        for r in runs
                        if r["step"] == "noop"
                        and r["backend"] == backend
                        and r["per_round"] == per_round
                        and r.get("completed")
                    ),
                    key=lambda r: r["registered"],
                )
                if rs:
                    ax.plot(
                        [r["registered"] for r in rs],
                        [max(r[field] * scale, 1e-3) for r in rs],
                        ls=ls,
                        marker=marker,
                        color=f"C{i}",
                        label=f"{backend}, {per_round}/round",
                    )
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
            ax.axhline(TARGETS["engine_ms_per_task_at_1000"], color="grey", lw=0.8, ls=":")
        else:
            zero_based(ax)
        ax.set_xlabel("registered virtual clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save(fig, path)


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| registered | per round | step | backend | setup s (partition + nodes) "
        "| round s (ideal) | engine ms/task | CPU ms/task | driver / total peak GiB |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        head = f"| {r['registered']:,} | {r['per_round']:,} | {r['step']} | {r['backend']} "
        if not r.get("completed"):
            lines.append(head + f"| {r.get('error', 'failed')} |||||")
            continue
        lines.append(
            head + f"| {r['setup_s']:.1f} ({r['partition_s']:.1f} + {r['nodes_s']:.1f}) "
            f"| {r['round_s_steady']:.2f} ({r['ideal_s_steady']:.2f}) "
            f"| {r['engine_ms_per_task']:.1f} "
            f"| {_num(r['round2_cpu_ms_per_task'])} "
            f"| {r['driver_peak_rss_bytes'] / 2**30:.2f} / {r['peak_rss_bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _pair(text: str) -> tuple[int, int]:
    a, b = text.split(":")
    return int(a), int(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--registered", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--per-round", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--tiny",
        type=_pair,
        nargs="*",
        default=[(1000, 10), (100_000, 100), (100_000, 1000)],
        help="REGISTERED:PER_ROUND pairs run with the real tiny local step",
    )
    ap.add_argument("--no-stock", action="store_true", help="skip Flower's stock backend")
    ap.add_argument("--profiles", action="store_true", help="three client tiers on the clock")
    ap.add_argument("--stock-limit", type=float, default=180.0, help="s per stock run")
    ap.add_argument("--limit", type=float, default=900.0, help="s per fedrag_ray run")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default: temp)")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    offline_env()
    if args.worker:
        return worker(args.worker)
    if args.prepare:
        return prepare(args.prepare)
    work = args.work or Path(tempfile.mkdtemp(prefix="fedrag-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FEDRAG_RAY_CACHE", str(work / "cache"))
    t_all = time.perf_counter()
    largest = max(args.registered)
    data = build_data(work, largest)
    print(f"data: {data['train_questions']:,} train questions", flush=True)
    shard_dir = str(work / "stores")
    base = make_config(data, 1000, 10, args.rounds, "noop", shard_dir)
    prep = run_sub(
        "prepare", {"label": "prepare", "config": base, "shard_dir": shard_dir}, work, 1800
    )
    if "error" in prep:
        raise SystemExit(f"preparation failed: {prep['error']}")

    pairs = [(n, k) for n in sorted(args.registered) for k in sorted(args.per_round) if k <= n]
    plan = [(n, k, "noop", "fedrag_ray") for n, k in pairs]
    if not args.no_stock:
        plan += [(n, k, "noop", "flower-stock") for n, k in pairs]
    plan += [(n, k, "tiny", "fedrag_ray") for n, k in args.tiny]
    runs: list[dict[str, Any]] = []
    for n, k, step, backend in plan:
        key = {"registered": n, "per_round": k, "step": step, "backend": backend}
        key["rounds"] = args.rounds
        label = f"{backend}-{step}-{n}-{k}"
        stock = backend == "flower-stock"
        beaten = [
            r
            for r in runs
            if r["backend"] == backend
            and r["step"] == step
            and r.get("timed_out")
            and r["registered"] <= n
            and r["per_round"] <= k
        ]
        if beaten:
            b = beaten[0]
            runs.append(
                {
                    **key,
                    "completed": False,
                    "skipped": True,
                    "error": f"skipped: {b['registered']:,} x {b['per_round']:,} already "
                    f"exceeded {args.stock_limit if stock else args.limit:g} s",
                }
            )
            print(f"=== {label}: {runs[-1]['error']}", flush=True)
            continue
        print(f"=== {label}", flush=True)
        spec = {
            "label": label,
            "config": make_config(data, n, k, args.rounds, step, shard_dir, args.profiles),
            "run_dir": str(work / "runs" / label),
            "num_cpus": args.num_cpus,
            "backend": backend,
        }
        res = run_sub("worker", spec, work, args.stock_limit if stock else args.limit)
        runs.append(figures(key, res))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "rounds_detail"}), flush=True)
        shutil.rmtree(work / "runs" / label, ignore_errors=True)

    targets = verdicts(runs, largest)
    payload = {
        "setup": {
            "registered": args.registered,
            "per_round": args.per_round,
            "rounds": args.rounds,
            "tiny_pairs": [list(p) for p in args.tiny],
            "profiles": PROFILES if args.profiles else None,
            "num_cpus": args.num_cpus,
            "client_resources": {"num_cpus": 1},
            "stock_limit_s": args.stock_limit,
            "fedrag_limit_s": args.limit,
            "tiny_step": "ralt, tiny-random generator + LoRA r=8, local_steps 2, batch 2, k 2",
            "data": {k: v for k, v in data.items() if k not in ("train", "eval", "corpus")},
            "index_seconds": prep["index_seconds"],
            "load_average_at_end": os.getloadavg(),
        },
        "definitions": {
            "setup_s": "partition_s + nodes_s (driver: partitions; engine: node registration "
            "until the server holds the partition <-> node mapping)",
            "round_s_steady": "mean over rounds 2..R of the server's training part of a round",
            "ideal_s_steady": "mean over rounds 2..R of sum(client train-seconds) / actors",
            "engine_ms_per_task": "1000 * (sum round_s - sum ideal_s) / client tasks, rounds 2..R",
            "round2_cpu_ms_per_task": "1000 * CPU seconds of the driver and all its "
            "descendants between the end of round 1 and of round 2 / round 2's tasks",
            "peak_rss_bytes": "peak over the run of the summed RSS of the driver and all its "
            "descendants, sampled every 0.2 s",
        },
        "targets": targets,
        "runs": runs,
        "total_seconds": time.perf_counter() - t_all,
    }
    path = write_result("simulation_scale", payload, args.out)
    plot(runs, args.out / "simulation_scale.png")
    print(f"wrote {path}")
    print(table(runs))
    print(json.dumps(targets, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
