"""Evaluation speed with the real default generator (SmolLM2-135M-Instruct), old vs new,
on the same PubMedQA questions in one run:

- ``old``: every (question, passage, option) its own full sequence, float32 — what
  ``evaluate`` did before (``label_predictions_per_sequence``);
- ``new_fp32``: one forward per (question, passage), the options' tokens scored on its
  KV cache (``label_predictions``), float32;
- ``new``: the same with bf16 autocast where the CPU has AMX/AVX512-BF16 (the default).

    python benchmarks/eval_speed.py [--questions 60] [--top-k 5] [--max-length 256]
        [--out benchmarks/results]

Accuracy and the agreement of predictions are reported next to the seconds, so a speed-up
that changed the answers would show.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import PUBMEDQA, RESULTS, offline_env, write_result

from fedrag_ray.config import config_from_dict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(PUBMEDQA))
    ap.add_argument("--questions", type=int, default=60)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    offline_env()
    import torch

    from fedrag_ray.data import load_dataset_from_config
    from fedrag_ray.evaluate import (
        label_predictions,
        label_predictions_per_sequence,
        retrieval_weights,
    )
    from fedrag_ray.rag import RAGSystem

    torch.set_num_threads(os.cpu_count() or 1)

    def make_cfg(autocast: str) -> Any:
        return config_from_dict(
            {
                "data": {"path": args.data, "max_eval": args.questions},
                "retriever": {"train": "none"},
                "generator": {"max_length": args.max_length, "autocast": autocast},
                "rag": {"top_k": args.top_k},
            }
        )

    # Two systems, not one with its autocast toggled: by default (bf16 autocast) the
    # frozen weights are stored in bf16, so a float32 forward needs its own fp32 model.
    cfg = make_cfg("none")
    data = load_dataset_from_config(cfg.data)
    system = RAGSystem(cfg)
    store = system.build_store(data.passages)
    held = data.eval
    questions = [e.question for e in held]
    scores, idx = system.retrieve(questions, args.top_k)
    ctx = [[store.passages[i].text for i in row if i >= 0] for row in idx]
    weights = retrieval_weights(scores, idx, cfg.train.lsr.tau)
    options = cfg.rag.label_options

    runs: dict[str, Any] = {}
    variants = [
        ("old", label_predictions_per_sequence, "none"),
        ("new_fp32", label_predictions, "none"),
        ("new", label_predictions, "auto"),  # the default
    ]
    for name, fn, autocast in variants:
        if autocast != system.cfg.generator.autocast:
            del system
            system = RAGSystem(make_cfg(autocast))
        t = time.perf_counter()
        preds = fn(system, questions, ctx, weights, options)
        seconds = time.perf_counter() - t
        runs[name] = {
            "seconds": seconds,
            "questions_per_s": len(questions) / seconds,
            "autocast": str(system.generator.autocast_dtype),
            "frozen_linear_dtype": str(
                next(
                    m.weight.dtype
                    for m in system.generator.model.modules()
                    if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad
                )
            ),
            "accuracy": float(np.mean([p == e.label for p, e in zip(preds, held, strict=True)])),
            "predictions": preds,
        }
        print(f"{name}: {seconds:.1f}s, accuracy {runs[name]['accuracy']:.3f}", flush=True)
    agree = {
        f"{a}_vs_old": float(
            np.mean(
                [
                    x == y
                    for x, y in zip(runs[a]["predictions"], runs["old"]["predictions"], strict=True)
                ]
            )
        )
        for a in ("new_fp32", "new")
    }
    result = {
        "questions": len(questions),
        "top_k": args.top_k,
        "max_length": args.max_length,
        "sequences_per_question_old": args.top_k * len(options),
        "forwards_per_question_new": args.top_k,
        "runs": runs,
        "speedup_new_vs_old": runs["old"]["seconds"] / runs["new"]["seconds"],
        "speedup_new_fp32_vs_old": runs["old"]["seconds"] / runs["new_fp32"]["seconds"],
        "prediction_agreement": agree,
        "target": ">= 3x faster evaluation, old vs new in one run",
    }
    path = write_result("eval_speed", result, args.out)
    print(
        f"speed-up new vs old {result['speedup_new_vs_old']:.2f}x "
        f"(fp32 only: {result['speedup_new_fp32_vs_old']:.2f}x); agreement {agree}; {path}"
    )
    plot(result, args.out / "eval_speed.png")


def plot(result: dict[str, Any], path: Path) -> None:
    from harness.plots import figure, save, zero_based

    names = list(result["runs"])
    secs = [result["runs"][n]["seconds"] for n in names]
    fig, ax = figure(size=(5, 3.2))
    ax.bar(names, secs, color=["#999", "#69c", "#36a"])
    for i, s in enumerate(secs):
        ax.text(i, s, f"{s:.0f}s", ha="center", va="bottom")
    ax.set_ylabel(f"seconds for {result['questions']} questions")
    ax.set_title(f"label evaluation, top-{result['top_k']} passages")
    zero_based(ax)
    save(fig, path)


if __name__ == "__main__":
    main()
