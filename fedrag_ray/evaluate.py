"""Evaluation: exact match, token F1 (SQuAD normalisation), label accuracy, recall@k, MRR.

Label accuracy (yes/no/maybe) scores each option with the REPLUG ensemble
p(a|q) = sum_d p_R(d|q) p_LM(a|d,q) over the top-k passages, or closed-book with no
passage; it never depends on free-form decoding luck.
"""

from __future__ import annotations

import re
import string
import time
from collections import Counter

import numpy as np
import torch

from fedrag_ray.data import QAExample
from fedrag_ray.knowledge_store import KnowledgeStore
from fedrag_ray.rag import RAGSystem


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def recall_at_k(retrieved_doc_ids: list[list[str]], gold: list[list[str]], k: int) -> float:
    hits = [bool(set(r[:k]) & set(g)) for r, g in zip(retrieved_doc_ids, gold, strict=True) if g]
    return float(np.mean(hits)) if hits else float("nan")


def mean_reciprocal_rank(retrieved_doc_ids: list[list[str]], gold: list[list[str]]) -> float:
    rr = []
    for r, g in zip(retrieved_doc_ids, gold, strict=True):
        if not g:
            continue
        rank = next((i + 1 for i, d in enumerate(r) if d in set(g)), None)
        rr.append(1.0 / rank if rank else 0.0)
    return float(np.mean(rr)) if rr else float("nan")


@torch.no_grad()
def label_predictions(
    system: RAGSystem,
    questions: list[str],
    passages: list[list[str]] | None,
    weights: np.ndarray | None,
    options: list[str],
) -> list[str]:
    """argmax over options of sum_d w_d P_LM(option | d, q); closed-book if no passages."""
    system.generator.model.eval()
    preds: list[str] = []
    chunk = 8  # questions per forward pass
    for start in range(0, len(questions), chunk):
        prompts, answers, shapes = [], [], []
        for qi in range(start, min(start + chunk, len(questions))):
            ctx = passages[qi] if passages is not None else [""]
            prompts += [system.prompt(questions[qi], c) for c in ctx for _ in options]
            answers += [o for _ in ctx for o in options]
            shapes.append((qi, len(ctx)))
        logp_all, _ = system.generator.answer_logprobs(prompts, answers)
        logp_all = logp_all.cpu().numpy()
        offset = 0
        for qi, n_ctx in shapes:
            logp = logp_all[offset : offset + n_ctx * len(options)].reshape(n_ctx, len(options))
            offset += n_ctx * len(options)
            w = weights[qi] if weights is not None else np.ones(1)
            # log sum_d w_d P(o | d, q)
            score = np.logaddexp.reduce(np.log(np.maximum(w, 1e-12))[:, None] + logp, axis=0)
            preds.append(options[int(np.argmax(score))])
    return preds


def evaluate(
    system: RAGSystem,
    examples: list[QAExample],
    store: KnowledgeStore | None = None,
    closed_book: bool = False,
    generate: bool = True,
) -> dict[str, float]:
    """Retrieval and answer metrics of ``system`` on ``examples``."""
    cfg = system.cfg
    store = store or system.store
    start = time.perf_counter()
    questions = [e.question for e in examples]
    gold = [e.gold_doc_ids for e in examples]
    metrics: dict[str, float] = {"n": float(len(examples))}
    top_k = cfg.rag.top_k
    max_k = max([top_k, 10, *cfg.eval.k_values])
    scores, idx = system.retrieve(questions, max_k, store)
    doc_ids = [[store.passages[i].doc_id for i in row if i >= 0] for row in idx]
    for k in cfg.eval.k_values:
        metrics[f"recall@{k}"] = recall_at_k(doc_ids, gold, k)
    metrics["mrr"] = mean_reciprocal_rank(doc_ids, gold)

    ctx_texts = (
        None
        if closed_book
        else [[store.passages[i].text for i in row[:top_k] if i >= 0] for row in idx]
    )
    weights = None
    if not closed_book:
        s = scores[:, :top_k] / cfg.train.lsr.tau
        weights = np.exp(s - s.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
    labelled = [e for e in examples if e.label is not None]
    if labelled and cfg.data.answer == "label":
        preds = label_predictions(system, questions, ctx_texts, weights, cfg.rag.label_options)
        metrics["accuracy"] = float(
            np.mean([p == e.label for p, e in zip(preds, examples, strict=True) if e.label])
        )
    if generate and cfg.eval.generate:
        prompts = [
            system.prompt(q, "" if closed_book else ctx[0])
            for q, ctx in zip(questions, ctx_texts or [[""]] * len(questions), strict=True)
        ]
        outs: list[str] = []
        for i in range(0, len(prompts), 16):
            outs += system.generator.generate(prompts[i : i + 16], cfg.rag.max_new_tokens)
        refs = [e.answer for e in examples]
        pairs = list(zip(outs, refs, strict=True))
        metrics["exact_match"] = float(np.mean([exact_match(o, r) for o, r in pairs]))
        metrics["f1"] = float(np.mean([token_f1(o, r) for o, r in pairs]))
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics


def closed_book_accuracy(system: RAGSystem, examples: list[QAExample]) -> float:
    """Label accuracy with no passage in the prompt (no retrieval pass needed)."""
    labelled = [e for e in examples if e.label is not None]
    if not labelled or system.cfg.data.answer != "label":
        return float("nan")
    preds = label_predictions(
        system, [e.question for e in labelled], None, None, system.cfg.rag.label_options
    )
    return float(np.mean([p == e.label for p, e in zip(preds, labelled, strict=True)]))
