"""Evaluation: exact match, token F1 (SQuAD normalisation), label accuracy, recall@k, MRR.

Label accuracy (yes/no/maybe) scores each option with the REPLUG ensemble
p(a|q) = sum_d p_R(d|q) p_LM(a|d,q) over the top-k passages, or closed-book with no
passage; it never depends on free-form decoding luck.

EM and F1 follow the official SQuAD v1.1 script: normalise (lower case, drop punctuation
and the articles a/an/the, collapse white space), then take the best score over all gold
answers. Every metric is also kept per question (:class:`Evaluation`), so each comes with
a bootstrap interval and two evaluations of the same questions compare as a paired
difference (``fedrag_ray.stats``).
"""

from __future__ import annotations

import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from fedrag_ray.data import QAExample
from fedrag_ray.knowledge_store import KnowledgeStore
from fedrag_ray.progress import ProgressFn, report
from fedrag_ray.rag import RAGSystem
from fedrag_ray.stats import with_intervals


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


def best_over_answers(metric, prediction: str, answers: list[str]) -> float:  # noqa: ANN001
    """SQuAD's ``metric_max_over_ground_truths``: the best score against any gold answer."""
    return max(metric(prediction, a) for a in answers)


def gold_answers(example: QAExample) -> list[str]:
    return example.answers or [example.answer]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over normalised tokens (longest common subsequence)."""
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    prev = [0] * (len(ref) + 1)
    for p in pred:
        cur = [0]
        for j, r in enumerate(ref):
            cur.append(prev[j] + 1 if p == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def hits_at_k(retrieved_doc_ids: list[list[str]], gold: list[list[str]], k: int) -> list[float]:
    """Per question: 1.0 if a gold doc is in the top k, NaN for a question without gold."""
    return [
        float(bool(set(r[:k]) & set(g))) if g else float("nan")
        for r, g in zip(retrieved_doc_ids, gold, strict=True)
    ]


def reciprocal_ranks(retrieved_doc_ids: list[list[str]], gold: list[list[str]]) -> list[float]:
    out = []
    for r, g in zip(retrieved_doc_ids, gold, strict=True):
        if not g:
            out.append(float("nan"))
            continue
        rank = next((i + 1 for i, d in enumerate(r) if d in set(g)), None)
        out.append(1.0 / rank if rank else 0.0)
    return out


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def recall_at_k(retrieved_doc_ids: list[list[str]], gold: list[list[str]], k: int) -> float:
    return _nanmean(hits_at_k(retrieved_doc_ids, gold, k))


def mean_reciprocal_rank(retrieved_doc_ids: list[list[str]], gold: list[list[str]]) -> float:
    return _nanmean(reciprocal_ranks(retrieved_doc_ids, gold))


def option_reserve(system: RAGSystem, options: list[str]) -> int:
    return max(system.answer_reserve(o) for o in options)


def _ensemble_argmax(logp: np.ndarray, weights: np.ndarray | None, options: list[str]) -> str:
    """argmax_o log sum_d w_d P(o | d, q) for one question; logp is (n_ctx, n_options)."""
    # uniform when there are no retrieval weights (closed book, or no real hit at all)
    w = weights if weights is not None and len(weights) == len(logp) else np.ones(len(logp))
    score = np.logaddexp.reduce(np.log(np.maximum(w, 1e-12))[:, None] + logp, axis=0)
    return options[int(np.argmax(score))]


@torch.no_grad()
def label_predictions(
    system: RAGSystem,
    questions: list[str],
    passages: list[list[str]] | None,
    weights: list[np.ndarray] | None,
    options: list[str],
    chunk_tokens: int = 1024,
    progress: ProgressFn | None = None,
    stage: str = "scoring labels",
) -> list[str]:
    """argmax over options of sum_d w_d P_LM(option | d, q) (REPLUG); closed-book if no
    passages. One forward per (question, passage) prompt: ``Generator.option_logprobs``
    shares each prompt's KV cache across the options."""
    system.generator.model.eval()
    reserve = option_reserve(system, options)
    prompts, owner = [], []
    for qi, q in enumerate(questions):
        ctx = passages[qi] if passages is not None and passages[qi] else [None]
        for c in ctx:
            prompts.append(system.prompt(q, c, reserve))
            owner.append(qi)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # less padding
    logp = np.zeros((len(prompts), len(options)), dtype=np.float64)
    # Batches by token budget (rows x longest prompt), longest prompts first: a forward's
    # activations and KV cache scale with it, and the speed does not (measured on SmolLM2,
    # 2 CPU threads: 4 vs 16 prompts of 256 tokens, same seconds, +0.14 vs +0.31 GB peak).
    lengths = [system.generator.count_tokens(prompts[i]) + reserve for i in order]
    s = 0
    report(progress, stage, 0, len(order))  # prompts: one per (question, passage)
    while s < len(order):
        rows = max(1, chunk_tokens // max(1, lengths[s]))
        idx = order[s : s + rows]
        logp[idx] = system.generator.option_logprobs([prompts[i] for i in idx], options).numpy()
        s += rows
        report(progress, stage, min(s, len(order)), len(order))
    owner_arr = np.asarray(owner)
    return [
        _ensemble_argmax(
            logp[owner_arr == qi], weights[qi] if weights is not None else None, options
        )
        for qi in range(len(questions))
    ]


@torch.no_grad()
def label_predictions_per_sequence(
    system: RAGSystem,
    questions: list[str],
    passages: list[list[str]] | None,
    weights: list[np.ndarray] | None,
    options: list[str],
    chunk: int = 8,
) -> list[str]:
    """The reference (and the pre-0.2 method): every (question, passage, option) as its own
    full sequence. Same predictions as :func:`label_predictions`, ~len(options)x the
    work; kept for the equality test and the evaluation-speed benchmark."""
    system.generator.model.eval()
    reserve = option_reserve(system, options)
    preds: list[str] = []
    for start in range(0, len(questions), chunk):
        for qi in range(start, min(start + chunk, len(questions))):
            ctx = passages[qi] if passages is not None and passages[qi] else [None]
            prompts = [system.prompt(questions[qi], c, reserve) for c in ctx for _ in options]
            answers = [o for _ in ctx for o in options]
            lp, _ = system.generator.answer_logprobs(prompts, answers)
            logp = lp.float().cpu().numpy().reshape(len(ctx), len(options))
            preds.append(
                _ensemble_argmax(logp, weights[qi] if weights is not None else None, options)
            )
    return preds


def retrieval_weights(scores: np.ndarray, idx: np.ndarray, tau: float) -> list[np.ndarray]:
    """p_R(d|q) = softmax(score / tau) over each row's *real* hits: ANN misses (index -1)
    are dropped, so weights stay aligned with the passages actually used."""
    out = []
    for s_row, i_row in zip(scores, idx, strict=True):
        s = s_row[i_row >= 0].astype(np.float64) / tau
        if not len(s):
            out.append(np.ones(0))
            continue
        w = np.exp(s - s.max())
        out.append(w / w.sum())
    return out


@dataclass
class Evaluation:
    """Aggregate metrics (with ``<name>_lo`` / ``<name>_hi`` 95% bootstrap bounds) and the
    per-question scores they came from, in the order of the evaluated questions."""

    metrics: dict[str, float]
    per_question: dict[str, list[float]] = field(default_factory=dict)
    predictions: list[str] = field(default_factory=list)


def evaluate(
    system: RAGSystem,
    examples: list[QAExample],
    store: KnowledgeStore | None = None,
    closed_book: bool = False,
    generate: bool = True,
    progress: ProgressFn | None = None,
) -> dict[str, float]:
    """Retrieval and answer metrics of ``system`` on ``examples`` (with interval bounds);
    ``progress(stage, done, total)`` after each batch of prompts (a long evaluation
    shows a moving count)."""
    return evaluate_detailed(system, examples, store, closed_book, generate, progress).metrics


def evaluate_detailed(
    system: RAGSystem,
    examples: list[QAExample],
    store: KnowledgeStore | None = None,
    closed_book: bool = False,
    generate: bool = True,
    progress: ProgressFn | None = None,
) -> Evaluation:
    """:func:`evaluate` with the per-question scores kept (paired comparisons need them)."""
    cfg = system.cfg
    store = store or system.store
    start = time.perf_counter()
    questions = [e.question for e in examples]
    gold = [e.gold_doc_ids for e in examples]
    per_q: dict[str, list[float]] = {}
    top_k = cfg.rag.top_k
    max_k = max([top_k, 10, *cfg.eval.k_values])
    scores, idx = system.retrieve(questions, max_k, store)
    retrieved = store.get(idx)  # passages per question, rank order (-1 hits dropped)
    doc_ids = [[p.doc_id for p in row] for row in retrieved]
    for k in cfg.eval.k_values:
        per_q[f"recall@{k}"] = hits_at_k(doc_ids, gold, k)
    per_q["mrr"] = reciprocal_ranks(doc_ids, gold)

    ctx_texts = None if closed_book else [[p.text for p in row[:top_k]] for row in retrieved]
    weights = (
        None
        if closed_book
        else retrieval_weights(scores[:, :top_k], idx[:, :top_k], cfg.train.lsr.tau)
    )
    answers, predictions = _answer_scores(system, examples, ctx_texts, weights, generate, progress)
    per_q.update(answers)
    if not closed_book and cfg.eval.closed_book:
        # The same questions with no passage: does retrieval matter? (no second search)
        cb, _ = _answer_scores(system, examples, None, None, generate, progress, "closed-book ")
        per_q.update({f"closed_book_{k}": v for k, v in cb.items()})
    metrics: dict[str, float] = {"n": float(len(examples))}
    metrics.update({k: _nanmean(v) for k, v in per_q.items()})
    metrics = with_intervals(
        metrics, per_q, cfg.eval.bootstrap_samples, cfg.eval.confidence, cfg.eval.bootstrap_seed
    )
    metrics["eval_seconds"] = time.perf_counter() - start
    return Evaluation(metrics, per_q, predictions)


def evaluate_answers_closed_book(
    system: RAGSystem, examples: list[QAExample], generate: bool = True
) -> dict[str, float]:
    """Answer metrics with no passage in the prompt."""
    per_q, _ = _answer_scores(system, examples, None, None, generate)
    return {k: _nanmean(v) for k, v in per_q.items()}


def _answer_scores(
    system: RAGSystem,
    examples: list[QAExample],
    ctx_texts: list[list[str]] | None,
    weights: list[np.ndarray] | None,
    generate: bool,
    progress: ProgressFn | None = None,
    prefix: str = "",
) -> tuple[dict[str, list[float]], list[str]]:
    """Per-question label accuracy (REPLUG ensemble; NaN for unlabelled questions) and
    generated-answer EM / F1 / ROUGE-L, with the given passages per question, or
    closed-book when ``ctx_texts`` is None; and the generated answers."""
    cfg = system.cfg
    questions = [e.question for e in examples]
    out: dict[str, list[float]] = {}
    outs: list[str] = []
    labelled = [e for e in examples if e.label is not None]
    if labelled and cfg.data.answer == "label":
        preds = label_predictions(
            system,
            questions,
            ctx_texts,
            weights,
            cfg.rag.label_options,
            progress=progress,
            stage=f"{prefix}scoring labels",
        )
        out["accuracy"] = [
            float(p == e.label) if e.label is not None else float("nan")
            for p, e in zip(preds, examples, strict=True)
        ]
    if generate and cfg.eval.generate:
        reserve = cfg.rag.max_new_tokens
        n_ctx = cfg.rag.generate_passages
        prompts = [
            system.prompt(q, None if ctx_texts is None else ctx_texts[i][:n_ctx], reserve)
            for i, q in enumerate(questions)
        ]
        generated = system.generator.generate(
            prompts, reserve, progress=progress, stage=f"{prefix}generating answers"
        )
        outs = [first_line(o) for o in generated]
        golds = [gold_answers(e) for e in examples]
        out["exact_match"] = [
            best_over_answers(exact_match, o, g) for o, g in zip(outs, golds, strict=True)
        ]
        out["f1"] = [best_over_answers(token_f1, o, g) for o, g in zip(outs, golds, strict=True)]
        out["rouge_l"] = [
            best_over_answers(rouge_l, o, g) for o, g in zip(outs, golds, strict=True)
        ]
    return out, outs


def first_line(text: str) -> str:
    """A generated answer ends at its first line break: what follows is the model
    continuing past its answer (a new "question:", an explanation), never part of it."""
    text = text.strip()
    return text.split("\n", 1)[0].strip() if text else text


def closed_book_accuracy(system: RAGSystem, examples: list[QAExample]) -> float:
    """Label accuracy with no passage in the prompt (no retrieval pass needed)."""
    if system.cfg.data.answer != "label":
        return float("nan")
    return evaluate_answers_closed_book(system, examples, generate=False).get(
        "accuracy", float("nan")
    )
