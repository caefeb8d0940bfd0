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
from fedrag_ray.runtime import seed_everything
from fedrag_ray.stats import paired_gains


def prepare_store(
    system: RAGSystem, data: RagDataset, show_progress: bool | ProgressFn = False
) -> KnowledgeStore:
    """Load the configured store if it exists (checking that it was built from this
    corpus, encoder and index settings), else build it and, when a path is configured,
    save it for the next run."""
    from fedrag_ray.provenance import check_provenance, store_provenance

    ks = system.cfg.knowledge_store
    if ks.path and Path(ks.path).exists():
        store = KnowledgeStore.load(ks.path, expected_dim=system.retriever.dim, device=ks.device)
        expected = store_provenance(system.retriever, data.passages, ks)
        check_provenance(
            ks.path,
            store.provenance,
            expected,
            "rebuild it with `fedrag-ray index build` or point knowledge_store.path elsewhere",
        )
        system.store = store
        return store
    store = system.build_store(data.passages, show_progress)
    if ks.path:
        store.save(ks.path)
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
    from fedrag_ray.tracking import track_centralized

    def run(*args: Any) -> dict[str, Any]:
        return _run_centralized(*args, train_subset=train_subset, progress=progress)

    return track_centralized(run, cfg, output, on_step, on_phase)


def _run_centralized(
    cfg: ExperimentConfig,
    output: str | Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    train_subset: list[int] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    phase = on_phase or (lambda _msg: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    phase("loading data")
    data = load_dataset_from_config(cfg.data)
    if train_subset is not None:
        data.train = [data.train[i] for i in train_subset]
    phase("loading models")
    system = RAGSystem(cfg)
    init_loaded = load_init_state(system, cfg.train.init_from) if cfg.train.init_from else []
    timings["setup_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    phase(f"indexing {len(data.passages)} passages")
    store = prepare_store(system, data, progress or False)
    timings["index_s"] = time.perf_counter() - t

    held = eval_examples(cfg, data)
    t = time.perf_counter()
    phase(f"evaluating before training ({len(held)} questions)")
    before = (
        evaluate_detailed(system, held, store, progress=progress)
        if cfg.eval.before
        else Evaluation({})
    )
    timings["eval_before_s"] = time.perf_counter() - t

    t = time.perf_counter()
    losses: list[float] = []
    lrs: list[float] = []
    steps_done = 0

    def _step(step: int, loss: float) -> None:
        losses.append(loss)
        if on_step:
            on_step(len(losses), loss)

    per_epoch = math.ceil(len(data.train) / cfg.train.batch_size)
    total = cfg.train.max_steps or per_epoch * cfg.train.epochs
    # One optimizer and one LR schedule for the whole run (AdamW's moments carry over
    # epochs); every epoch is the same local_train a federated client runs.
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
        steps_done, lrs = res.steps, res.lrs
    else:
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
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    phase("evaluating after training")
    after = evaluate_detailed(system, held, store, progress=progress)
    timings["eval_after_s"] = time.perf_counter() - t
    ev = cfg.eval
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
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "trainable_state.npz", npz_bytes(system.trainable_state()))
        if losses:
            from fedrag_ray.plots import loss_curve

            loss_curve(losses, out / "loss_curve.png", f"{cfg.train.method} loss ({cfg.name})")
        atomic_write_json(out / "results.json", results)
    results["system"] = system  # in-process callers (tests) may inspect it; not serialised
    return results
