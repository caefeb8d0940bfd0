"""quality_squad's RALT task for the peer: the job file it trains and evaluates on, and the
scoring of its answers with our metrics and statistics (runs in our venv).

The job holds exactly what ``benchmarks/quality_squad.py`` trains and evaluates on for the
same ``--eval`` / ``--steps`` / ``--max-articles``: the bundled ``squad`` config with that
benchmark's overrides, loaded by fedrag_ray's own loader (same training questions and
target answer, same held-out questions with all their gold answers, every paragraph as a
passage), and the training settings of that config (LoRA, batch, steps, learning-rate
schedule, top-k passages, new tokens).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np


def squad_config(
    eval_n: int, steps: int, max_articles: int | None, max_questions: int | None = None
) -> Any:
    """The resolved config of quality_squad's ``ralt_s0`` row; ``max_questions`` keeps the
    first questions of its held-out set (smoke runs that still pair with its rows)."""
    import quality_squad

    from fedrag_ray.config import load_config

    ns = argparse.Namespace(eval=eval_n, steps=steps, max_articles=max_articles)
    overrides = {**quality_squad.base_overrides(ns), "seed": 0, "eval.before": False}
    if max_questions:
        overrides["eval.max_questions"] = max_questions
    return load_config("squad", overrides)


def export_job(cfg: Any, path: Path) -> dict[str, Any]:
    """Write the job JSON (training rows, evaluation questions, passages, settings)."""
    from harness import write_json

    from fedrag_ray.data import eval_examples, load_dataset_from_config
    from fedrag_ray.evaluate import gold_answers

    data = load_dataset_from_config(cfg.data)
    held = eval_examples(cfg, data)
    lora, train = cfg.generator.lora, cfg.train
    settings = {
        "seed": cfg.seed,
        "steps": train.max_steps,
        "batch_size": train.batch_size,
        "lr": train.lr,
        "warmup_steps": train.warmup_steps,
        "lr_schedule": train.lr_schedule,
        "min_lr_ratio": train.min_lr_ratio,
        "weight_decay": train.weight_decay,
        "grad_clip": train.grad_clip,
        "lora_r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "lora_targets": list(lora.target_modules),
        "top_k": train.ralt.k,
        "max_new_tokens": cfg.rag.max_new_tokens,
    }
    if train.lr_schedule != "cosine":
        raise ValueError(f"train.lr_schedule {train.lr_schedule!r}: the peer job maps cosine only")
    job = {
        "settings": settings,
        "train": [{"query": e.question, "response": e.answer} for e in data.train],
        "eval": [
            {"id": e.id, "question": e.question, "answers": gold_answers(e), "gold": e.gold_doc_ids}
            for e in held
        ],
        "passages": [{"id": p.id, "text": p.text} for p in data.passages],
    }
    write_json(path, job, indent=0)
    return job


def score(job: dict[str, Any], predictions: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-question EM, F1 (official normalisation, best over the gold answers, first line
    of the answer) and recall@1 of the retrieved passage, in the job's question order."""
    from fedrag_ray.evaluate import best_over_answers, exact_match, first_line, token_f1

    by_id = {p["id"]: p for p in predictions}
    out: dict[str, list[float]] = {"exact_match": [], "f1": [], "recall@1": []}
    for q in job["eval"]:
        p = by_id[q["id"]]
        answer = first_line(p["response"])
        out["exact_match"].append(best_over_answers(exact_match, answer, q["answers"]))
        out["f1"].append(best_over_answers(token_f1, answer, q["answers"]))
        out["recall@1"].append(float(bool(set(p["retrieved"][:1]) & set(q["gold"]))))
    return out


def summary(per_q: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    from fedrag_ray.stats import bootstrap_ci

    out = {}
    for k, v in per_q.items():
        ci = bootstrap_ci(v)
        out[k] = {"mean": ci.mean, "lo": ci.lo, "hi": ci.hi}
    return out


def ours_per_question(run_dir: Path, ids: list[str]) -> dict[str, np.ndarray] | None:
    """A quality_squad row's per-question scores in the job's order (None when the row is
    absent or was evaluated on other questions)."""
    res_path = run_dir / "results.json"
    if not res_path.exists():
        return None
    res = json.loads(res_path.read_text())
    pq, their_ids = res.get("per_question_after"), res.get("eval_ids")
    if not pq or their_ids is None or set(ids) - set(their_ids):
        return None
    pos = {q: i for i, q in enumerate(their_ids)}
    return {k: np.asarray(v, dtype=float)[[pos[q] for q in ids]] for k, v in pq.items()}


def comparisons(peer: dict[str, list[float]], ids: list[str], runs: Path) -> list[dict[str, Any]]:
    """Paired differences (same questions) of the peer against our rows that exist."""
    from fedrag_ray.stats import paired_difference

    out = []
    for row in ("zero_shot", "ralt_s0", "ralt_s1", "ralt_s2"):
        ours = ours_per_question(runs / row, ids)
        if ours is None:
            continue
        for metric in ("exact_match", "f1", "recall@1"):
            if metric not in ours:
                continue
            d = paired_difference(peer[metric], ours[metric])
            out.append(
                {
                    "name": f"peer_vs_{row}",
                    "metric": metric,
                    "diff": d.mean,
                    "lo": d.lo,
                    "hi": d.hi,
                    "excludes_zero": d.excludes_zero,
                    "questions": d.n,
                }
            )
    return out
