"""How far can LSR move open-domain SQuAD retrieval with the RALT-trained generator as
teacher, and how far do the retriever settings take it?

    python benchmarks/lsr_squad_teacher.py [--questions 160] [--runs RUN_DIR ...]

Why this exists: ``quality_squad``'s LSR row (LoRA on the query encoder, 100 steps of 8,
``retriever_lr`` 1e-4) leaves recall@1 over the 18,896 paragraphs where it was. Either the
retriever barely moved, or the teacher has little to teach. This measures both:

1. *The teacher's ceiling*, on the first N training questions (no validation question):
   how often LSR's target over the retriever's top k (the posterior
   p_R(d|q) · P(a|q,d)^(1/β), ``fedrag_ray.methods.lsr_distributions``) puts the gold
   paragraph first, against how often the retriever alone does. LSR distils that target
   into the query encoder, so the difference is about the most recall@1 it can add.
2. *Each LSR run* passed with ``--runs`` (a ``fedrag-ray train`` directory evaluated
   before and after on the validation articles, retrieval only): the paired recall@1 /
   recall@5 / MRR gain with its 95% interval, beside the retriever settings it used, and
   the paired recall@1 gain on the training questions (does it fit what it saw?).

The runs in ``benchmarks/results/lsr_squad_teacher.json`` were made with (one core each;
``--set knowledge_store.path=runs/stores/squad`` reuses quality_squad's index):

    fedrag-ray train squad -o runs/lsr_pilot/lr3e-3 --set train.method=lsr \\
      --set train.init_from=runs/quality_squad/ralt_s0 --set train.retriever_lr=3e-3 \\
      --set train.max_steps=20 --set train.warmup_steps=2 --set eval.generate=false \\
      --set eval.closed_book=false --set eval.before=true
    fedrag-ray train squad -o runs/lsr_pilot/full2e-5 ... --set retriever.train=full \\
      --set train.retriever_lr=2e-5 --set train.max_steps=150 --set train.warmup_steps=10

Writes OUT/lsr_squad_teacher.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, RESULTS, offline_env, write_result

TEACHER = REPO / "runs" / "quality_squad" / "ralt_s0"
STORE = REPO / "runs" / "stores" / "squad"


def teacher_ceiling(questions: int, teacher: Path, store_path: Path) -> dict[str, Any]:
    """Top-1 agreement with the gold paragraph: the retriever's and LSR's target's.

    The target as ``fedrag_ray.methods.lsr_distributions`` forms it, but from the query
    encoder in eval mode (training samples dropout): the ranking a step starts from."""
    import torch
    import torch.nn.functional as F

    from fedrag_ray.centralized import load_init_state, prepare_store
    from fedrag_ray.config import load_config
    from fedrag_ray.data import load_dataset_from_config
    from fedrag_ray.rag import RAGSystem

    cfg = load_config("squad", {"train.method": "lsr", "knowledge_store.path": str(store_path)})
    lsr = cfg.train.lsr
    data = load_dataset_from_config(cfg.data)
    system = RAGSystem(cfg)
    load_init_state(system, teacher)
    store = prepare_store(system, data)
    system.generator.model.eval()
    counts = dict.fromkeys(("gold_in_top_k", "retriever", "target", "fixes", "breaks"), 0)
    counts |= {"target_answer_elsewhere": 0}
    p_gold = {"retriever": 0.0, "target": 0.0}
    for ex in data.train[:questions]:
        sim, idx = store.search(system.retriever.encode_queries([ex.question]), lsr.k)
        passages = store.get(idx[0])[0]
        gold = next((j for j, p in enumerate(passages) if p.doc_id in ex.gold_doc_ids), None)
        if gold is None:
            continue
        reserve = system.answer_reserve(ex.answer)
        prompts = [system.prompt(ex.question, p.text, reserve) for p in passages]
        with torch.no_grad():
            lm_logp, _ = system.generator.answer_logprobs(prompts, [ex.answer] * len(prompts))
        log_p_r = F.log_softmax(torch.from_numpy(sim[0]).float() / lsr.tau, dim=-1)
        scores = lm_logp.float() / lsr.beta
        log_target = F.log_softmax(scores + log_p_r if lsr.target == "posterior" else scores, -1)
        r_top, t_top = int(log_p_r.argmax()), int(log_target.argmax())
        counts["gold_in_top_k"] += 1
        counts["retriever"] += r_top == gold
        counts["target"] += t_top == gold
        counts["fixes"] += t_top == gold != r_top
        counts["breaks"] += r_top == gold != t_top
        # the target prefers another paragraph that also holds the answer string
        counts["target_answer_elsewhere"] += t_top != gold and ex.answer in passages[t_top].text
        p_gold["retriever"] += float(log_p_r[gold].exp())
        p_gold["target"] += float(log_target[gold].exp())
    n, found = questions, max(1, counts["gold_in_top_k"])
    return {
        "questions": n,
        "k": lsr.k,
        "tau": lsr.tau,
        "beta": lsr.beta,
        "target": lsr.target,
        "teacher": str(teacher.relative_to(REPO) if teacher.is_relative_to(REPO) else teacher),
        "gold_in_top_k": counts["gold_in_top_k"] / n,
        "retriever_top1_gold": counts["retriever"] / n,
        "target_top1_gold": counts["target"] / n,
        "ceiling_recall1_gain": (counts["target"] - counts["retriever"]) / n,
        "target_fixes": counts["fixes"],
        "target_breaks": counts["breaks"],
        "target_top1_other_paragraph_with_answer": counts["target_answer_elsewhere"] / n,
        "mean_p_gold_retriever": p_gold["retriever"] / found,
        "mean_p_gold_target": p_gold["target"] / found,
    }


def train_recall_gains(runs: list[Path], store_path: Path) -> list[dict[str, Any]]:
    """Per run, the paired recall@1 gain of its query encoder on the *training* questions
    (the ones its steps drew from, and the rest of the same articles): does LSR fit what
    it saw, even where the validation articles do not move? The untrained encoder's hits
    are computed once: every run starts from it."""
    from fedrag_ray.centralized import load_init_state, prepare_store
    from fedrag_ray.config import load_config
    from fedrag_ray.data import load_dataset_from_config
    from fedrag_ray.evaluate import hits_at_k
    from fedrag_ray.rag import RAGSystem
    from fedrag_ray.stats import paired_difference

    def config(query_encoder: str) -> Any:
        return load_config(
            "squad",
            {
                "generator.model": "tiny-random",  # retrieval only
                "train.method": "lsr",  # so the query encoder has the run's adapters
                "retriever.train": query_encoder,
                "knowledge_store.path": str(store_path),
            },
        )

    base = RAGSystem(config("lora"))
    data = load_dataset_from_config(base.cfg.data)
    store = prepare_store(base, data)  # the index of the untrained encoder
    questions, gold = [e.question for e in data.train], [e.gold_doc_ids for e in data.train]

    def hits(system: Any) -> list[float]:
        _, idx = store.search(system.retriever.encode_queries(questions), 1)
        return hits_at_k([[p.doc_id for p in row] for row in store.get(idx)], gold, 1)

    before, rows = hits(base), []
    for run in runs:
        res = json.loads((run / "results.json").read_text())
        system = RAGSystem(config(res["config"]["retriever"]["train"]))
        load_init_state(system, run)
        gain = paired_difference(hits(system), before)
        rows.append(
            {
                "train questions": len(questions),
                "train recall@1 before": sum(before) / len(before),
                "train recall@1 gain": gain.mean,
                "train recall@1 gain 95% CI": f"[{gain.lo:+.3f}, {gain.hi:+.3f}]",
            }
        )
    return rows


def run_row(run_dir: Path) -> dict[str, Any]:
    """One LSR run's settings and its paired retrieval gains on the validation articles."""
    res = json.loads((run_dir / "results.json").read_text())
    cfg, gain = res["config"], res.get("gain") or {}
    if not gain:
        raise SystemExit(f"{run_dir}: no paired gain (run it with eval.before=true)")
    row: dict[str, Any] = {
        "run": run_dir.name,
        "query encoder": cfg["retriever"]["train"],
        "retriever_lr": cfg["train"]["retriever_lr"],
        "steps": res["steps"],
        "eval questions": res["num_eval"],
    }
    for key in ("recall@1", "recall@5", "mrr"):
        g = gain[key]
        row[f"{key} gain"] = g["mean"]
        row[f"{key} gain 95% CI"] = f"[{g['lo']:+.3f}, {g['hi']:+.3f}]"
    row["train s"] = round(res["timings"]["train_s"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=160, help="training questions scored")
    ap.add_argument("--teacher", type=Path, default=TEACHER, help="the RALT run directory")
    ap.add_argument("--store", type=Path, default=STORE)
    ap.add_argument("--runs", type=Path, nargs="*", default=[], help="LSR run directories")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    offline_env()
    rows = [run_row(r) for r in args.runs]  # fail on a bad run before the slow part
    for row, train in zip(rows, train_recall_gains(args.runs, args.store), strict=True):
        row.update(train)
    ceiling = teacher_ceiling(args.questions, args.teacher, args.store)
    path = write_result("lsr_squad_teacher", {**ceiling, "rows": rows}, args.out)
    print(json.dumps({**ceiling, "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
