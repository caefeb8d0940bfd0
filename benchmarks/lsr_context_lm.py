"""Does LSR raise held-out recall when the LM's likelihood carries a relevance signal?

    python benchmarks/lsr_context_lm.py [--out benchmarks/results] [--lsr-steps 120]

Why this exists: on PubMedQA (``quality_pubmedqa.py``) recall@1 of the gold abstract is
already 0.99 before any training (the questions are the papers' titles), and a 135M
generator scoring a one-word yes/no answer gives LSR's teacher, p_LM(answer | passage,
question), little to tell the passages apart by. Neither says whether fedrag_ray's LSR
moves the retriever the right way. This benchmark builds the one thing missing, an LM
that reads its context, on a task with room to improve, and measures LSR on questions no
training step touches.

The task (synthetic, seeded, generated here; no data files): 240 made-up people, each
with 8 one-sentence passages that all name the person — one says which word they chose
as their password, seven are distractors (home town, hobby, a word they misspelt, a
secret diary, ...) that contain other words from the same vocabulary. The question is
"What is the secret word of <name>?", the answer is the password word and the gold
passage is the password sentence. Out of the box MiniLM ranks the same person's
distractors close to the gold passage, so recall@1 starts well below 1. 160 people are
used for training; 80 are held out (their questions are never used by a training step;
their passages are in the index).

1. *Context warm-up of the generator* (stands in for a pretrained LM): the default
   offline generator architecture, all weights trainable, learns p(answer | gold passage,
   question) on the training people only, and is saved as an ordinary Hugging Face model
   directory that the LSR runs load as ``generator.model``. Its held-out context
   sensitivity is reported: log p(answer | gold) - log p(answer | distractor) on held-out
   people, and how often the gold passage makes the answer most likely.
2. *LSR* (fedrag_ray.methods.local_train, method lsr, query-encoder LoRA), generator
   frozen, on training questions; recall@1/5 and MRR on held-out questions before/after.
3. The same LSR run with the *untrained* generator as teacher (what PubMedQA had).
4. The same LSR run federated (4 clients, IID, FedAvg) at equal total local steps.

Steps 2 and 3 run with both teacher targets: the default ``posterior`` (p_R · P(a|q,d))
and REPLUG's ``lm`` (``*_replug`` rows), so a change of default is checked against an
informative and an uninformative teacher in one run.

Writes OUT/lsr_context_lm.json and OUT/lsr_context_lm.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import RESULTS, offline_env, write_result

N_PEOPLE, N_TRAIN_PEOPLE = 240, 160
WORDS = (
    "apple river stone cloud tiger lemon piano candle forest silver garden rocket window "
    "marble pepper violin castle ocean falcon copper meadow lantern thunder orchid harbor "
    "saddle walnut glacier pillow banner coral ember hammer jacket kettle ladder mirror "
    "needle orange parrot quartz ribbon shovel tulip velvet wagon yellow zebra anchor "
    "barrel cherry dragon engine feather ginger helmet island jungle kitten lizard magnet"
).split()
FIRST = "Zor Kel Mav Tri Bel Dor Fen Gal Hes Ivo Jun Kor Lum Nir Oss Pel Quin Rav Sol Tam".split()
LAST = "vath lin dris mont zeck orra bane wick sell rund".split()
TOWNS = "Oslo Lima Cairo Quito Perth Dakar Hanoi Tunis Riga Sofia".split()
DISTRACTORS = (
    "{name} grew up in {town} and still keeps a {w} on the desk.",
    "{name} spends weekends painting pictures of a {w}.",
    "{name} owns a pet named after a {w}.",
    "{name} once lost a {w} on the train to {town}.",
    "{name} wrote a short story about a {w}.",
    "{name} could not spell the word {w} in a school quiz.",
    "{name} keeps a secret diary about a {w}.",
)
GOLD = "{name} chose the word {w} as a password."
QUESTION = "What is the secret word of {name}?"


def make_task(seed: int, work: Path) -> dict[str, Any]:
    """qa_jsonl train/eval files and a corpus, all seeded."""
    rng = np.random.default_rng(seed)
    names = [f"{f} {last.capitalize()}{s}" for f in FIRST for last in LAST for s in ("", "ek")]
    names = [names[i] for i in rng.permutation(len(names))[:N_PEOPLE]]
    corpus, rows = [], []
    for p, name in enumerate(names):
        words = [WORDS[i] for i in rng.choice(len(WORDS), size=1 + len(DISTRACTORS), replace=False)]
        town = TOWNS[int(rng.integers(len(TOWNS)))]
        corpus.append(
            {"id": f"p{p}-gold", "text": GOLD.format(name=name, w=words[0]), "doc_id": f"p{p}-gold"}
        )
        for j, tpl in enumerate(DISTRACTORS):
            corpus.append(
                {
                    "id": f"p{p}-d{j}",
                    "text": tpl.format(name=name, w=words[j + 1], town=town),
                    "doc_id": f"p{p}-d{j}",
                }
            )
        rows.append(
            {
                "id": f"p{p}",
                "question": QUESTION.format(name=name),
                "answer": words[0],
                "gold_ids": [f"p{p}-gold"],
            }
        )
    work.mkdir(parents=True, exist_ok=True)
    paths = {
        "train": work / "train.jsonl",
        "eval": work / "eval.jsonl",
        "corpus": work / "corpus.jsonl",
    }
    for key, data in (
        ("train", rows[:N_TRAIN_PEOPLE]),
        ("eval", rows[N_TRAIN_PEOPLE:]),
        ("corpus", corpus),
    ):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in data))
    return {k: str(v) for k, v in paths.items()}


def base_config(paths: dict[str, str], steps: int) -> dict[str, Any]:
    return {
        "name": "lsr_context_lm",
        "seed": 0,
        "data": {
            "format": "qa_jsonl",
            "path": paths["train"],
            "corpus": paths["corpus"],
            "eval_path": paths["eval"],
        },
        "retriever": {"model": "default", "train": "lora", "lora_r": 8, "lora_alpha": 16},
        "generator": {
            "model": "tiny-random",  # warmed up below to read its context: a known teacher
            "max_length": 64,
            "tiny_spec": {
                "hidden_size": 128,
                "num_layers": 2,
                "num_heads": 4,
                "intermediate_size": 256,
            },
        },
        "knowledge_store": {"index": "flat"},
        "rag": {"top_k": 5},
        "train": {
            "method": "lsr",
            "batch_size": 8,
            "lr": 1e-3,
            "retriever_lr": 1e-3,
            "max_steps": steps,
            "lsr": {"k": 6, "tau": 0.05, "beta": 1.0},
        },
        "eval": {"k_values": [1, 5], "generate": False},
    }


def warm_up_generator(system: Any, data: Any, steps: int, lr: float, out: Path) -> dict:
    """Full fine-tuning of the generator on (gold passage, question) -> answer, training
    people only; the result (LoRA merged) is saved to ``out`` as a plain HF model."""
    import torch

    gen = system.generator
    gold = {p.doc_id: p.text for p in data.passages}
    params = list(gen.model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr)
    rng = np.random.default_rng(1)
    train = data.train
    losses = []
    gen.model.train()
    for _ in range(steps):
        batch = [train[i] for i in rng.choice(len(train), size=16, replace=False)]
        prompts = [system.prompt(e.question, gold[e.gold_doc_ids[0]]) for e in batch]
        loss = gen.loss(prompts, [e.answer for e in batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    merged = gen.model.merge_and_unload()
    merged.save_pretrained(out)
    gen.tokenizer.save_pretrained(out)
    return {"first_loss": float(np.mean(losses[:10])), "last_loss": float(np.mean(losses[-10:]))}


def context_sensitivity(system: Any, data: Any) -> dict[str, float]:
    """Held-out people: mean log p(answer | gold) - log p(answer | each distractor), and
    how often the gold passage gives the answer the highest likelihood of the six."""
    import torch

    by_person: dict[str, list[Any]] = {}
    for p in data.passages:
        by_person.setdefault(p.doc_id.split("-")[0], []).append(p)
    gaps, wins = [], []
    system.generator.model.eval()
    with torch.no_grad():
        for e in data.eval:
            ps = by_person[e.id]
            logp, _ = system.generator.answer_logprobs(
                [system.prompt(e.question, p.text) for p in ps], [e.answer] * len(ps)
            )
            lp = logp.numpy()
            g = [i for i, p in enumerate(ps) if p.doc_id == e.gold_doc_ids[0]][0]
            gaps.append(float(lp[g] - np.mean(np.delete(lp, g))))
            wins.append(float(int(np.argmax(lp)) == g))
    return {
        "logp_gap_gold_vs_distractor": float(np.mean(gaps)),
        "gold_is_most_likely": float(np.mean(wins)),
    }


def retrieval_metrics(system: Any, data: Any, store: Any) -> dict[str, float]:
    """recall@1/5 and MRR on the held-out questions, by fedrag_ray's own evaluation."""
    from fedrag_ray.evaluate import evaluate

    metrics = evaluate(system, data.eval, store, generate=False)
    return {k: metrics[k] for k in ("recall@1", "recall@5", "mrr")}


def federated(raw: dict[str, Any], steps: int, clients: int, rounds: int) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))
    out["train"]["max_steps"] = None
    out["federation"] = {
        "num_clients": clients,
        "rounds": rounds,
        "local_steps": max(1, steps // (clients * rounds)),
        "eval_every": rounds,
        "client_resources": {"num_cpus": 1},
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--warmup-steps", type=int, default=400)
    ap.add_argument("--lsr-steps", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    offline_env()
    import copy

    import torch

    from fedrag_ray.config import apply_overrides, config_from_dict
    from fedrag_ray.data import load_dataset_from_config
    from fedrag_ray.federated.simulation import run_federated
    from fedrag_ray.methods import local_train
    from fedrag_ray.rag import RAGSystem

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(args.out)
    work = out / "tmp" / "lsr_context_lm"
    t0 = time.perf_counter()
    paths = make_task(args.seed, work / "data")
    raw_untrained = base_config(paths, args.lsr_steps)
    cfg = config_from_dict(raw_untrained)
    data = load_dataset_from_config(cfg.data)
    base = RAGSystem(cfg)
    store = base.build_store(data.passages)
    result: dict[str, Any] = {
        "task": {
            "people": N_PEOPLE,
            "train_people": N_TRAIN_PEOPLE,
            "held_out_questions": len(data.eval),
            "passages": len(data.passages),
            "passages_per_person": 1 + len(DISTRACTORS),
        },
        "runs": {},
    }
    before = retrieval_metrics(base, data, store)
    result["retrieval_before"] = before
    result["untrained_lm_context"] = context_sensitivity(base, data)
    t = time.perf_counter()
    lm_dir = work / "context-lm"
    result["warmup"] = warm_up_generator(base, data, args.warmup_steps, 3e-3, lm_dir)
    result["warmup"]["seconds"] = time.perf_counter() - t
    result["warmup"]["steps"] = args.warmup_steps
    raw_ctx = apply_overrides(raw_untrained, {"generator.model": str(lm_dir)})
    cfg_ctx = config_from_dict(raw_ctx)
    ctx_system = RAGSystem(cfg_ctx, retriever=copy.deepcopy(base.retriever), store=store)
    result["context_lm_context"] = context_sensitivity(ctx_system, data)
    result["config_context_lm"] = raw_ctx
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "retrieval_before",
                    "untrained_lm_context",
                    "warmup",
                    "context_lm_context",
                )
            }
        ),
        flush=True,
    )

    def central(name: str, c: Any) -> None:
        system = RAGSystem(c, store=store)
        t = time.perf_counter()
        res = local_train(system, data.train, store, key=(0, 0), steps=args.lsr_steps)
        result["runs"][name] = {
            "before": before,
            "after": retrieval_metrics(system, data, store),
            "steps": res.steps,
            "first_loss": float(np.mean(res.losses[:10])),
            "last_loss": float(np.mean(res.losses[-10:])),
            "seconds": time.perf_counter() - t,
        }
        print(name, json.dumps(result["runs"][name]), flush=True)

    replug = {"train.lsr.target": "lm"}
    central("central_lsr_context_lm", cfg_ctx)
    central("central_lsr_context_lm_replug", config_from_dict(apply_overrides(raw_ctx, replug)))
    central("central_lsr_untrained_lm", cfg)
    central(
        "central_lsr_untrained_lm_replug", config_from_dict(apply_overrides(raw_untrained, replug))
    )
    clients, rounds = 4, 4
    t = time.perf_counter()
    fed = run_federated(
        config_from_dict(federated(raw_ctx, args.lsr_steps, clients, rounds)),
        work / "fed4_iid",
        num_cpus=os.cpu_count(),
    )
    hist = fed["history"]
    keys = ("recall@1", "recall@5", "mrr")
    result["runs"][f"fed{clients}_iid_lsr_context_lm"] = {
        "before": {k: hist[0][k] for k in keys},
        "after": {k: hist[-1][k] for k in keys},
        "steps": sum(c["steps"] for h in hist[1:] for c in h["clients"]),
        "rounds": rounds,
        "clients": clients,
        "seconds": time.perf_counter() - t,
    }
    print("federated", json.dumps(result["runs"][f"fed{clients}_iid_lsr_context_lm"]), flush=True)
    result["total_seconds"] = time.perf_counter() - t0
    write_result("lsr_context_lm", result, out)
    plot(result, out / "lsr_context_lm.png")
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    lines = ["| run | steps | recall@1 | recall@5 | MRR |", "|---|---|---|---|---|"]
    b = result["retrieval_before"]
    lines.append(
        f"| before (MiniLM) | 0 | {b['recall@1']:.3f} | {b['recall@5']:.3f} | {b['mrr']:.3f} |"
    )
    for name, r in result["runs"].items():
        a = r["after"]
        lines.append(
            f"| {name} | {r['steps']} | {a['recall@1']:.3f} | {a['recall@5']:.3f} | "
            f"{a['mrr']:.3f} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    from harness.plots import figure, rate_axis, save

    keys = ["recall@1", "recall@5", "mrr"]
    names = ["before", *result["runs"]]
    values = [result["retrieval_before"], *[r["after"] for r in result["runs"].values()]]
    fig, ax = figure(size=(8, 4))
    width = 0.8 / len(names)
    for i, (name, v) in enumerate(zip(names, values, strict=True)):
        ax.bar([j + i * width for j in range(len(keys))], [v[k] for k in keys], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
    rate_axis(ax)
    ax.set_title("LSR on held-out questions: context-reading LM vs untrained LM as teacher")
    ax.legend(fontsize=7)
    save(fig, path)


if __name__ == "__main__":
    main()
