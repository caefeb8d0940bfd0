"""Quality on real data: PubMedQA PQA-L train/val, before and after fine-tuning.

    python benchmarks/quality_pubmedqa.py [--data ../shared/data/pubmedqa/pqal_trainval.json]
                                          [--steps 160] [--out benchmarks/results]

Knowledge store = every abstract section of the 500 items; gold passage = the question's
own abstract. A fixed held-out validation fold (20 %, `data.split_seed`) is never touched
by any training step. Runs, all at the same total number of local steps:

- before training (the same models everyone starts from);
- centralized LSR alone, RALT alone, both (RA-DIT, alternating);
- federated "both" with 8 clients: IID, Dirichlet(0.3) over the label, split by year;
- RALT on long answers (LONG_ANSWER) for token F1, closed-book vs with retrieval.

Metrics: recall@1/5 and MRR of the gold abstract; accuracy on yes/no/maybe, closed-book
and with retrieval (REPLUG ensemble over the top 5); token F1 of generated long answers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedrag_ray.config import apply_overrides, config_from_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pubmedqa" / "pqal_trainval.json"
KEYS = ["recall@1", "recall@5", "mrr", "accuracy", "closed_book_accuracy", "f1"]


def base_config(data: str, store: str, steps: int) -> dict[str, Any]:
    return {
        "name": "quality",
        "seed": 0,
        "data": {"format": "pubmedqa", "path": data, "eval_fraction": 0.2, "split_seed": 0},
        "retriever": {"model": "default", "train": "full"},
        "generator": {
            "model": "default",
            "max_length": 192,
            "lora": {
                "r": 8,
                "alpha": 16,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            },
        },
        "knowledge_store": {"index": "flat", "path": store},
        "rag": {"top_k": 5, "max_new_tokens": 48},
        "train": {
            "method": "both",
            "batch_size": 4,
            "lr": 3e-3,
            "retriever_lr": 2e-5,
            "max_steps": steps,
            "lsr": {"tau": 0.1, "beta": 1.0, "k": 5},
            "ralt": {"k": 2},
        },
        "eval": {"k_values": [1, 5], "generate": False},
    }


def federated(raw: dict[str, Any], partition: dict[str, Any], steps: int) -> dict[str, Any]:
    clients, rounds = 8, 4
    local = max(1, steps // (clients * rounds))
    out = apply_overrides(raw, {"train.max_steps": None})
    out["federation"] = {
        "num_clients": clients,
        "rounds": rounds,
        "local_steps": local,
        "partition": partition,
        "eval_every": rounds,
        "client_resources": {"num_cpus": 1},
    }
    return out


def run(name: str, raw: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    from fedrag_ray.centralized import run_centralized
    from fedrag_ray.federated.simulation import run_federated

    cfg = config_from_dict(raw)
    t = time.perf_counter()
    if cfg.federation:
        res = run_federated(cfg, out_dir / name)
        after = res["history"][-1]
        steps = sum(c["steps"] for h in res["history"][1:] for c in h["clients"])
        before = res["history"][0]
    else:
        res = run_centralized(cfg, out_dir / name)
        after, before, steps = res["metrics_after"], res["metrics_before"], res["steps"]
    row = {
        "run": name,
        "method": cfg.train.method,
        "federated": cfg.federation is not None,
        "partition": cfg.federation.partition.model_dump() if cfg.federation else None,
        "answer": cfg.data.answer,
        "total_local_steps": steps,
        "seconds": time.perf_counter() - t,
        "before": {k: before.get(k) for k in KEYS if k in before},
        "after": {k: after.get(k) for k in KEYS if k in after},
    }
    print(
        json.dumps({k: row[k] for k in ("run", "total_local_steps", "seconds", "after")}),
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--steps", type=int, default=160, help="total local steps per run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--only", nargs="*", help="run names to run (default: all)")
    args = ap.parse_args()

    out = Path(args.out)
    work = out / "tmp" / "quality"
    work.mkdir(parents=True, exist_ok=True)
    raw = base_config(str(Path(args.data).resolve()), str(work / "store"), args.steps)
    runs = {
        "central_lsr": apply_overrides(raw, {"train.method": "lsr"}),
        "central_ralt": apply_overrides(raw, {"train.method": "ralt"}),
        "central_both": raw,
        "fed8_iid_both": federated(raw, {"type": "iid"}, args.steps),
        "fed8_dirichlet0.3_both": federated(
            raw, {"type": "dirichlet", "alpha": 0.3, "field": "label"}, args.steps
        ),
        "fed8_year_both": federated(raw, {"type": "field", "field": "year"}, args.steps),
        "central_ralt_long": apply_overrides(
            raw,
            {
                "train.method": "ralt",
                "data.answer": "long",
                "eval.generate": True,
                "eval.max_questions": 50,
            },
        ),
    }
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only}
    t0 = time.perf_counter()
    rows = [run(name, r, work) for name, r in runs.items()]
    result = {
        "benchmark": "quality_pubmedqa",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "data": args.data,
        "steps_per_run": args.steps,
        "total_seconds": time.perf_counter() - t0,
        "runs": rows,
    }
    (out / "quality_pubmedqa.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / "quality_pubmedqa.png")
    print(markdown(rows))


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | steps | recall@5 before → after | MRR after | accuracy (RAG) before → after | "
        "closed-book acc after | F1 after |",
        "|---|---|---|---|---|---|---|",
    ]

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(
            f"| {r['run']} | {r['total_local_steps']} | {f(b.get('recall@5'))} → "
            f"{f(a.get('recall@5'))} | {f(a.get('mrr'))} | {f(b.get('accuracy'))} → "
            f"{f(a.get('accuracy'))} | {f(a.get('closed_book_accuracy'))} | {f(a.get('f1'))} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from fedrag_ray.plots import plt

    keys = ["recall@5", "mrr", "accuracy"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 4), squeeze=False)
    names = [r["run"] for r in rows]
    for ax, key in zip(axes[0], keys, strict=True):
        before = [r["before"].get(key) or 0 for r in rows]
        after = [r["after"].get(key) or 0 for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], before, width=0.4, label="before")
        ax.bar([i + 0.2 for i in x], after, width=0.4, label="after")
        ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
