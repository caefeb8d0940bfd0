"""RA-DIT / REPLUG fine-tuning objectives and the local training loop.

- RALT (retrieval-augmented LM training, RA-DIT §2.3): each of the top-k retrieved
  passages is paired with the question as a *separate* example, and the generator's loss
  counts the answer tokens only.
- LSR (LM-supervised retrieval, REPLUG / RA-DIT §2.4): minimise
  KL(p_LM(d|q,a) || p_R(d|q)) over the top-k, where p_R = softmax(sim(q,d)/tau) carries a
  gradient into the query encoder and p_LM is a fixed target (no gradient): by default
  the posterior p_R(d|q)·P_LM(a|d,q)^(1/beta), or REPLUG's softmax(log P_LM(a|d,q)/beta)
  with ``lsr.target: lm`` (see ``LsrConfig``).

``local_train`` is the one training loop: the centralized run calls it once per epoch and
a federated client calls it once per round, so both execute the same step functions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fedrag_ray.config import TrainConfig
from fedrag_ray.data import QAExample
from fedrag_ray.knowledge_store import KnowledgeStore
from fedrag_ray.rag import RAGSystem
from fedrag_ray.runtime import torch_seeded


def ralt_loss(system: RAGSystem, batch: list[QAExample], store: KnowledgeStore) -> torch.Tensor:
    k = system.cfg.train.ralt.k
    _, idx = system.retrieve([ex.question for ex in batch], k, store)
    prompts, answers = [], []
    for ex, passages in zip(batch, store.get(idx), strict=True):
        reserve = system.answer_reserve(ex.answer)
        for p in passages:
            prompts.append(system.prompt(ex.question, p.text, reserve))
            answers.append(ex.answer)
    return system.generator.loss(prompts, answers)


def lsr_distributions(
    system: RAGSystem, batch: list[QAExample], store: KnowledgeStore
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p_R with grad, log p_LM without grad, valid), all shaped (batch, k).

    p_LM is the teacher: by default the posterior, REPLUG's softmax(log P(a|q,d)/β) times
    the detached p_R; with ``lsr.target: lm`` REPLUG's alone (see ``LsrConfig``).

    ANN indexes may return fewer than k hits (index -1): those entries are masked out of
    both distributions (log-prob -inf, ``valid`` False) instead of crashing or scoring
    passage -1. Both live on the query encoder's device."""
    from fedrag_ray.generator import eval_mode

    cfg = system.cfg.train.lsr
    q = system.retriever.encode_queries_train([ex.question for ex in batch])  # (B, d)
    k = min(cfg.k, len(store))
    _, idx = store.search(q.detach().float().cpu().numpy(), k)
    valid_np = idx >= 0
    valid = torch.from_numpy(valid_np).to(q.device)
    p_emb = torch.from_numpy(store.vectors(idx)).to(q.device)
    sim = torch.einsum("bd,bkd->bk", q, p_emb.to(q.dtype))
    log_p_r = F.log_softmax((sim / cfg.tau).masked_fill(~valid, float("-inf")), dim=-1)
    with torch.no_grad(), eval_mode(system.generator.model):
        pairs = [(b, j) for b in range(len(batch)) for j in range(k) if valid_np[b, j]]
        texts = {
            int(i): p.text for i, p in zip(idx[valid_np], store.get(idx[valid_np])[0], strict=True)
        }
        prompts, answers = [], []
        for b, j in pairs:
            ex = batch[b]
            reserve = system.answer_reserve(ex.answer)
            prompts.append(system.prompt(ex.question, texts[int(idx[b, j])], reserve))
            answers.append(ex.answer)
        lm_logp, _ = system.generator.answer_logprobs(prompts, answers)
        scores = torch.full((len(batch), k), float("-inf"), device=q.device)
        rows = torch.tensor([b for b, _ in pairs], device=q.device)
        cols = torch.tensor([j for _, j in pairs], device=q.device)
        scores[rows, cols] = lm_logp.float().to(q.device) / cfg.beta
        if cfg.target == "posterior":  # p(d|q,a) ∝ p_R(d|q) · P(a|q,d)^(1/β)
            scores = scores + log_p_r.detach().float()
        log_p_lm = F.log_softmax(scores, dim=-1)
    return log_p_r, log_p_lm, valid


def lsr_loss(system: RAGSystem, batch: list[QAExample], store: KnowledgeStore) -> torch.Tensor:
    """KL(p_LM || p_R) = sum p_LM (log p_LM - log p_R), averaged over the questions that
    have at least two real passages (with one, both distributions are 1 and KL is 0)."""
    log_p_r, log_p_lm, valid = lsr_distributions(system, batch, store)
    rows = valid.sum(dim=1) >= 2
    if not bool(rows.any()):
        return (log_p_r.masked_fill(~valid, 0.0) * 0.0).sum()  # no signal, keeps the graph
    terms = torch.where(valid, log_p_lm.exp() * (log_p_lm - log_p_r), torch.zeros_like(log_p_r))
    return terms[rows].sum(dim=1).mean()


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate at global step ``step`` of ``total``: linear
    warmup over ``warmup_steps``, then constant, linear or cosine decay to
    ``min_lr_ratio``."""
    warm = cfg.warmup_steps
    if step < warm:
        return (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    low = cfg.min_lr_ratio
    if cfg.lr_schedule == "linear":
        return 1.0 - (1.0 - low) * progress
    return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(system: RAGSystem) -> torch.optim.Optimizer:
    """AdamW over what the method trains: generator LoRA at ``lr``, the query encoder at
    ``retriever_lr``."""
    cfg = system.cfg.train
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
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule, entered at ``start_step`` (a federated client in round r starts
    at (r - 1) x local steps of the run's rounds x local steps)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(start_step + s, total_steps, cfg)
    )


@dataclass
class LocalTrainResult:
    steps: int = 0
    num_examples: int = 0
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)  # generator (first group) LR per step
    ralt_steps: int = 0
    lsr_steps: int = 0
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.losses)) if self.losses else float("nan")


def batches_for(
    n: int, batch_size: int, seed: int, key: tuple[int, ...], epochs: int, steps: int | None
) -> list[np.ndarray]:
    """Seeded shuffles, one per epoch; with ``steps`` the epochs repeat until enough.
    An empty client (``n == 0``) gets no batches: no number of epochs would fill them."""
    if n == 0:
        return []
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
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    start_step: int = 0,
    total_steps: int | None = None,
) -> LocalTrainResult:
    """Train the system's trainable parameters on ``examples`` in place.

    ``key`` seeds the batch order: centralized epoch e uses (0, e); a federated client
    uses (partition, round - 1). ``start_step`` is the global step this call begins at:
    ``both_mode: alternate`` alternates RALT/LSR on the *global* step (so one local step
    per round still alternates across rounds) and the LR schedule is read there.
    A centralized run passes its one ``optimizer``/``scheduler`` to every call; without
    them a fresh AdamW is made (a federated client's per-round optimizer) with the
    schedule over ``total_steps`` (default: this call's steps). ``proximal_mu`` > 0 adds
    FedProx's mu/2 ||w - w_global||^2.
    """
    # Dropout (e.g. in the query encoder) draws from torch's global RNG: seed it from the
    # key so a client's update does not depend on which clients its actor served before
    # (resumed and uninterrupted runs then match); the caller's RNG state comes back after.
    dropout_seed = int(np.random.default_rng([system.cfg.seed, *key]).integers(2**31))
    with torch_seeded(dropout_seed):
        return _train_steps(
            system,
            examples,
            store,
            key=key,
            epochs=epochs,
            steps=steps,
            proximal_mu=proximal_mu,
            on_step=on_step,
            optimizer=optimizer,
            scheduler=scheduler,
            start_step=start_step,
            total_steps=total_steps,
        )


def _train_steps(
    system: RAGSystem,
    examples: list[QAExample],
    store: KnowledgeStore,
    *,
    key: tuple[int, ...],
    epochs: int,
    steps: int | None,
    proximal_mu: float,
    on_step: Callable[[int, float], None] | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    start_step: int,
    total_steps: int | None,
) -> LocalTrainResult:
    """``local_train``'s loop, under its seeded RNG."""
    cfg = system.cfg.train
    start = time.perf_counter()
    order = batches_for(len(examples), cfg.batch_size, system.cfg.seed, key, epochs, steps)
    if optimizer is None:
        optimizer = make_optimizer(system)
        total = total_steps or (start_step + len(order))
        scheduler = make_scheduler(optimizer, cfg, total, start_step)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None

    result = LocalTrainResult()
    for step, idx in enumerate(order):
        global_step = start_step + step
        batch = [examples[i] for i in idx]
        system.generator.model.train()
        use_ralt = cfg.method == "ralt" or (
            cfg.method == "both" and (cfg.both_mode == "combined" or global_step % 2 == 0)
        )
        use_lsr = cfg.method == "lsr" or (
            cfg.method == "both" and (cfg.both_mode == "combined" or global_step % 2 == 1)
        )
        parts = []
        if use_ralt:
            parts.append(ralt_loss(system, batch, store))
            result.ralt_steps += 1
        if use_lsr:  # on the query encoder's device; the sum lives on the first part's
            parts.append(lsr_loss(system, batch, store).to(parts[0].device if parts else None))
            result.lsr_steps += 1
        loss = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        objective = loss
        if anchor is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
            objective = loss + 0.5 * proximal_mu * prox
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        result.lrs.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        result.losses.append(float(loss.detach()))
        result.steps += 1
        result.num_examples += len(batch)
        if on_step is not None:
            on_step(step, result.losses[-1])
    result.seconds = time.perf_counter() - start
    return result
