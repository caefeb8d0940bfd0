"""Centralized fine-tuning: one site, all training questions, the same ``local_train`` a
federated client runs. Writes ``results.json`` (metrics before/after, config, seed,
timings), the trainable state and a loss-curve PNG."""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedrag_ray.atomic import atomic_write_bytes, atomic_write_json, npz_bytes
from fedrag_ray.config import ExperimentConfig
from fedrag_ray.data import RagDataset, eval_examples, load_dataset_from_config
from fedrag_ray.evaluate import Evaluation, evaluate_detailed
from fedrag_ray.knowledge_store import KnowledgeStore
from fedrag_ray.methods import local_train, make_optimizer, make_scheduler
from fedrag_ray.progress import ProgressFn
from fedrag_ray.rag import RAGSystem
from fedrag_ray.runtime import seeded
from fedrag_ray.stats import paired_gains


def prepare_store(
    system: RAGSystem, data: RagDataset, show_progress: bool | ProgressFn = False
) -> KnowledgeStore:
    """Load the configured store if it exists (checking that it was built from this
    corpus, encoder and index settings), else build it and, when a path is configured,
    save it for the next run (``provenance.ensure_store``)."""
    from fedrag_ray.provenance import ensure_store, store_provenance

    ks = system.cfg.knowledge_store
    if not ks.path:
        return system.build_store(data.passages, show_progress)
    _, built = ensure_store(
        ks.path,
        store_provenance(system.retriever, data.passages, ks),
        lambda: system.build_store(data.passages, show_progress),
        "rebuild it with `fedrag-ray index build` or point knowledge_store.path elsewhere",
    )
    if built is not None:
        return built
    store = KnowledgeStore.load(ks.path, expected_dim=system.retriever.dim, device=ks.device)
    system.store = store
    return store


def load_init_state(system: RAGSystem, source: str | Path) -> list[str]:
    """Load ``train.init_from`` (a run directory or a ``trainable_state.npz``) into the
    system: every array whose name matches a parameter of the generator or the query
    encoder, trained by this method or not. Returns the names loaded; none matching is an
    error (a wrong file would otherwise be silently ignored)."""
    import numpy as np
    import torch

    path = Path(source)
    if path.is_dir():
        path = path / "trainable_state.npz"
    if not path.is_file():
        raise FileNotFoundError(f"train.init_from: {path} does not exist")
    state = dict(np.load(path))
    params = {
        **{f"generator.{n}": p for n, p in system.generator.model.named_parameters()},
        **{f"retriever.{n}": p for n, p in system.retriever.query_encoder.named_parameters()},
    }
    loaded = []
    with torch.no_grad():
        for name, value in state.items():
            p = params.get(name)
            if p is None or tuple(p.shape) != value.shape:
                continue
            p.copy_(torch.from_numpy(value).to(p.dtype))
            loaded.append(name)
    if not loaded:
        raise ValueError(f"train.init_from: no array of {path} matches this system's parameters")
    return loaded


def run_centralized(
    cfg: ExperimentConfig,
    output: str | Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    train_subset: list[int] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """One-site fine-tuning; a ``tracking:`` section also logs it (fedrag_ray.tracking).

    ``train_subset``: indices into the training questions to train on instead of all of
    them — one federated client's partition trained alone (the local-only baseline).
    ``progress(stage, done, total)``: indexing and evaluation batches as they finish."""
    from fedrag_ray.compat import check_versions
    from fedrag_ray.tracking import track_centralized

    check_versions()  # peft's private hooks: the tested version

    def run(*args: Any) -> dict[str, Any]:
        return _run_centralized(*args, train_subset=train_subset, progress=progress)

    return track_centralized(run, cfg, output, on_step, on_phase)


def _train(
    system: RAGSystem,
    data: RagDataset,
    store: KnowledgeStore,
    on_step: Callable[[int, float], None] | None,
    phase: Callable[[str], None],
) -> tuple[list[float], list[float], int]:
    """The training loop: (loss per step, LR per step, steps done). One optimizer and one
    LR schedule for the whole run (AdamW's moments carry over epochs); every epoch is the
    same ``local_train`` a federated client runs."""
    cfg = system.cfg
    losses: list[float] = []
    lrs: list[float] = []
    steps_done = 0

    def _step(step: int, loss: float) -> None:
        losses.append(loss)
        if on_step:
            on_step(len(losses), loss)

    per_epoch = math.ceil(len(data.train) / cfg.train.batch_size)
    total = cfg.train.max_steps or per_epoch * cfg.train.epochs
    optimizer = make_optimizer(system)
    scheduler = make_scheduler(optimizer, cfg.train, total)
    if cfg.train.max_steps:
        phase(f"training {cfg.train.method} for {cfg.train.max_steps} steps")
        res = local_train(
            system,
            data.train,
            store,
            key=(0, 0),
            steps=cfg.train.max_steps,
            on_step=_step,
            optimizer=optimizer,
            scheduler=scheduler,
        )
        return losses, res.lrs, res.steps
    for epoch in range(cfg.train.epochs):
        phase(f"training {cfg.train.method}, epoch {epoch + 1}/{cfg.train.epochs}")
        res = local_train(
            system,
            data.train,
            store,
            key=(0, epoch),
            on_step=_step,
            optimizer=optimizer,
            scheduler=scheduler,
            start_step=steps_done,
        )
        steps_done += res.steps
        lrs += res.lrs
    return losses, lrs, steps_done


def _save(
    out: Path,
    cfg: ExperimentConfig,
    system: RAGSystem,
    losses: list[float],
    results: dict[str, Any],
) -> None:
    """The trained arrays, the loss curve and ``results.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "trainable_state.npz", npz_bytes(system.trainable_state()))
    if losses:
        from fedrag_ray.plots import loss_curve

        loss_curve(losses, out / "loss_curve.png", f"{cfg.train.method} loss ({cfg.name})")
    atomic_write_json(out / "results.json", results)


def _run_centralized(
    cfg: ExperimentConfig,
    output: str | Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    train_subset: list[int] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """The run, with the global RNGs seeded by ``cfg.seed`` for its duration only."""
    with seeded(cfg.seed):
        return _run_seeded(cfg, output, on_step, on_phase, train_subset, progress)


def _setup(
    cfg: ExperimentConfig, train_subset: list[int] | None, phase: Callable[[str], None]
) -> tuple[RagDataset, RAGSystem, list[str]]:
    """The data (``train_subset``: one client's partition alone), the system and the
    arrays loaded from ``train.init_from``."""
    phase("loading data")
    data = load_dataset_from_config(cfg.data)
    if train_subset is not None:
        data.train = [data.train[i] for i in train_subset]
    phase("loading models")
    system = RAGSystem(cfg)
    init_loaded = load_init_state(system, cfg.train.init_from) if cfg.train.init_from else []
    return data, system, init_loaded


def _run_seeded(
    cfg: ExperimentConfig,
    output: str | Path | None,
    on_step: Callable[[int, float], None] | None,
    on_phase: Callable[[str], None] | None,
    train_subset: list[int] | None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    phase = on_phase or (lambda _msg: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data, system, init_loaded = _setup(cfg, train_subset, phase)
    timings["setup_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    phase(f"indexing {len(data.passages)} passages")
    store = prepare_store(system, data, progress or False)
    timings["index_s"] = time.perf_counter() - t

    held = eval_examples(cfg, data)
    t = time.perf_counter()
    phase(f"evaluating before training ({len(held)} questions)")
    before = _evaluate_before(system, held, store, progress)
    timings["eval_before_s"] = time.perf_counter() - t

    t = time.perf_counter()
    losses, lrs, steps_done = _train(system, data, store, on_step, phase)
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    phase("evaluating after training")
    after = evaluate_detailed(system, held, store, progress=progress)
    timings["eval_after_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    results = {
        "mode": "centralized",
        "name": cfg.name,
        "seed": cfg.seed,
        "method": cfg.train.method,
        "num_train": len(data.train),
        "num_eval": len(held),
        "num_passages": len(data.passages),
        "steps": steps_done,
        **_evaluation_results(cfg, before, after, held),
        "init_from": {"path": cfg.train.init_from, "arrays": len(init_loaded)}
        if cfg.train.init_from
        else None,
        "loss_history": losses,
        "lr_history": lrs,
        "timings": timings,
        "trainable_parameters": int(sum(v.size for v in system.trainable_state().values())),
        "full_model_bytes": system.full_model_bytes(),
        "platform": {"python": platform.python_version(), "machine": platform.machine()},
        "config": cfg.model_dump(mode="json"),
    }
    if output:
        _save(Path(output), cfg, system, losses, results)
    results["system"] = system  # in-process callers (tests) may inspect it; not serialised
    return results


def _evaluate_before(
    system: RAGSystem, held: list[Any], store: KnowledgeStore, progress: ProgressFn | None
) -> Evaluation:
    """The evaluation before training; none when ``eval.before`` is off."""
    if not system.cfg.eval.before:
        return Evaluation({})
    return evaluate_detailed(system, held, store, progress=progress)


def _evaluation_results(
    cfg: ExperimentConfig, before: Evaluation, after: Evaluation, held: list[Any]
) -> dict[str, Any]:
    """The metrics before and after, the paired gain and the per-question detail."""
    ev = cfg.eval
    return {
        "metrics_before": before.metrics,
        "metrics_after": after.metrics,
        # after minus before on the same questions, with the paired bootstrap interval
        "gain": paired_gains(
            after.per_question,
            before.per_question,
            ev.bootstrap_samples,
            ev.confidence,
            ev.bootstrap_seed,
        ),
        "per_question_before": before.per_question,
        "per_question_after": after.per_question,
        "predictions_after": after.predictions,
        "eval_ids": [e.id for e in held],
    }
