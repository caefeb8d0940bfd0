"""RA-DIT / REPLUG fine-tuning objectives and the local training loop.

- RALT (retrieval-augmented LM training, RA-DIT §2.3): each of the top-k retrieved
  passages is paired with the question as a *separate* example, and the generator's loss
  counts the answer tokens only.
- LSR (LM-supervised retrieval, REPLUG / RA-DIT §2.4): minimise
  KL(p_LM(d|q,a) || p_R(d|q)) over the top-k, where p_R = softmax(sim(q,d)/tau) carries a
  gradient into the query encoder and p_LM = softmax(log P_LM(a|d,q)/beta) is a fixed
  target (no gradient).

``local_train`` is the one training loop: the centralized run calls it once per epoch and
a federated client calls it once per round, so both execute the same step functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fedrag_ray.data import QAExample
from fedrag_ray.knowledge_store import KnowledgeStore
from fedrag_ray.rag import RAGSystem


def ralt_loss(system: RAGSystem, batch: list[QAExample], store: KnowledgeStore) -> torch.Tensor:
    k = system.cfg.train.ralt.k
    _, idx = system.retrieve([ex.question for ex in batch], k, store)
    prompts, answers = [], []
    for ex, row in zip(batch, idx, strict=True):
        for i in row[row >= 0]:
            prompts.append(system.prompt(ex.question, store.passages[i].text))
            answers.append(ex.answer)
    return system.generator.loss(prompts, answers)


def lsr_distributions(
    system: RAGSystem, batch: list[QAExample], store: KnowledgeStore
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_R with grad, log p_LM without grad), both shaped (batch, k)."""
    cfg = system.cfg.train.lsr
    q = system.retriever.encode_queries_train([ex.question for ex in batch])  # (B, d)
    k = min(cfg.k, len(store))
    _, idx = store.search(q.detach().cpu().numpy(), k)
    if (idx < 0).any():
        raise RuntimeError("LSR needs k real passages per question; lower train.lsr.k")
    p_emb = torch.from_numpy(store.embeddings[idx]).to(q.device)  # (B, k, d), fixed
    sim = torch.einsum("bd,bkd->bk", q, p_emb)
    log_p_r = F.log_softmax(sim / cfg.tau, dim=-1)
    with torch.no_grad():
        prompts = [
            system.prompt(ex.question, store.passages[i].text)
            for ex, row in zip(batch, idx, strict=True)
            for i in row
        ]
        answers = [ex.answer for ex in batch for _ in range(k)]
        system.generator.model.eval()
        lm_logp, _ = system.generator.answer_logprobs(prompts, answers)
        log_p_lm = F.log_softmax(lm_logp.view(len(batch), k) / cfg.beta, dim=-1)
    return log_p_r, log_p_lm


def lsr_loss(system: RAGSystem, batch: list[QAExample], store: KnowledgeStore) -> torch.Tensor:
    log_p_r, log_p_lm = lsr_distributions(system, batch, store)
    # KL(p_LM || p_R) = sum p_LM (log p_LM - log p_R), averaged over questions.
    return F.kl_div(log_p_r, log_p_lm, log_target=True, reduction="batchmean")


@dataclass
class LocalTrainResult:
    steps: int = 0
    num_examples: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")


def batches_for(
    n: int, batch_size: int, seed: int, key: tuple[int, ...], epochs: int, steps: int | None
) -> list[np.ndarray]:
    """Seeded shuffles, one per epoch; with ``steps`` the epochs repeat until enough."""
    out: list[np.ndarray] = []
    epoch = 0
    while True:
        order = np.random.default_rng([seed, *key, epoch]).permutation(n)
        out.extend(order[i : i + batch_size] for i in range(0, n, batch_size))
        epoch += 1
        if steps is None and epoch >= epochs:
            return out
        if steps is not None and len(out) >= steps:
            return out[:steps]


def local_train(
    system: RAGSystem,
    examples: list[QAExample],
    store: KnowledgeStore,
    *,
    key: tuple[int, ...],
    epochs: int = 1,
    steps: int | None = None,
    proximal_mu: float = 0.0,
    on_step: Callable[[int, float], None] | None = None,
) -> LocalTrainResult:
    """Train the system's trainable parameters on ``examples`` in place.

    ``key`` seeds the batch order: centralized epoch e uses (0, e); a federated client
    uses (partition, round - 1). ``proximal_mu`` > 0 adds FedProx's mu/2 ||w - w_global||^2.
    """
    cfg = system.cfg.train
    start = time.perf_counter()
    # Dropout (e.g. in the query encoder) draws from torch's global RNG: seed it from the
    # key so a client's update does not depend on which clients its actor served before
    # (resumed and uninterrupted runs then match).
    torch.manual_seed(int(np.random.default_rng([system.cfg.seed, *key]).integers(2**31)))
    modules = system.trainable_modules()
    groups = []
    if "generator" in modules:
        gen_params = [p for p in modules["generator"].parameters() if p.requires_grad]
        groups.append({"params": gen_params, "lr": cfg.lr})
    if "retriever" in modules:
        groups.append(
            {
                "params": [p for p in modules["retriever"].parameters() if p.requires_grad],
                "lr": cfg.retriever_lr,
            }
        )
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None

    result = LocalTrainResult()
    order = batches_for(len(examples), cfg.batch_size, system.cfg.seed, key, epochs, steps)
    for step, idx in enumerate(order):
        batch = [examples[i] for i in idx]
        system.generator.model.train()
        if cfg.method == "ralt":
            loss = ralt_loss(system, batch, store)
        elif cfg.method == "lsr":
            loss = lsr_loss(system, batch, store)
        elif cfg.both_mode == "combined":
            loss = ralt_loss(system, batch, store) + lsr_loss(system, batch, store)
        elif step % 2 == 0:
            loss = ralt_loss(system, batch, store)
        else:
            loss = lsr_loss(system, batch, store)
        objective = loss
        if anchor is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
            objective = loss + 0.5 * proximal_mu * prox
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        result.losses.append(float(loss.detach()))
        result.steps += 1
        result.num_examples += len(batch)
        if on_step is not None:
            on_step(step, result.losses[-1])
    result.seconds = time.perf_counter() - start
    return result
