"""Experiment tracking of ``train`` and ``simulate`` runs: MLflow and TensorBoard.

Why not only Ray Tune's logger callbacks: those log sweeps; a single centralized or
federated run should land in the same MLflow experiment with its per-step (centralized)
or per-round (federated) metrics, its config as params and the fine-tuned model itself.

What a tracked run logs (config section ``tracking:``, :class:`fedrag_ray.config.TrackingConfig`):

- params: the whole config, flattened to dotted keys (``train.lr``);
- metrics: centralized ``train_loss`` per step and the evaluation metrics at step 0
  (before) and at the last step (after); federated every numeric field of each round's
  row (``train_loss``, evaluation metrics, bytes, seconds) at step = round;
- artifacts: ``results.json``, the plots and, with ``log_model``, the export directory
  (:func:`fedrag_ray.export.export_run`, without the store) under ``model/``; for a
  federated run in a spawned child process, so the driver still holds no model.

MLflow names allow no ``@``: ``recall@5`` is logged as ``recall_at_5``. A ``file:`` store
needs ``MLFLOW_ALLOW_FILE_STORE=true`` since MLflow 3 (maintenance mode); it is set for
such URIs, which the user asked for by configuring one.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fedrag_ray.atomic import atomic_write_bytes, npz_bytes
from fedrag_ray.config import ExperimentConfig

MLFLOW_PARAM_BATCH = 100  # MLflow's log_batch limit for params
MLFLOW_PARAM_MAX = 6000  # characters of one param value


def tracking_enabled(cfg: ExperimentConfig) -> bool:
    t = cfg.tracking
    return bool(t.mlflow_uri or t.tensorboard or t.keep_rounds)


def metric_name(key: str) -> str:
    """A metric key every backend accepts (MLflow: alphanumerics, ``_-. :/``)."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", key.replace("@", "_at_"))


def numeric_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a results row (no bools, lists, NaN)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if math.isfinite(float(v)):
            out[metric_name(k)] = float(v)
    return out


def flatten_config(cfg: ExperimentConfig) -> dict[str, str]:
    """Dotted keys → string values (lists and dicts as JSON), the tune section left out."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            text = node if isinstance(node, str) else json.dumps(node)
            out[prefix] = text[:MLFLOW_PARAM_MAX]

    dumped = cfg.model_dump(mode="json")
    dumped.pop("tune", None)
    walk("", dumped)
    return out


def _mlflow_uri(uri: str) -> str:
    """Absolute ``file://`` URI for a path or ``file:`` URI (relative to the cwd)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") and not parsed.netloc:
        path = parsed.path if parsed.scheme else uri
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return Path(path).expanduser().resolve().as_uri()
    return uri


class RunTracker:
    """MLflow run and/or TensorBoard writer of one ``train`` / ``simulate`` run."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, mode: str) -> None:
        t = cfg.tracking
        self.run_dir = run_dir
        self.mode = mode
        self.client: Any = None
        self.run_id: str | None = None
        self.writer: Any = None
        if t.mlflow_uri:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(_mlflow_uri(t.mlflow_uri))
            exp = self.client.get_experiment_by_name(t.mlflow_experiment)
            exp_id = (
                exp.experiment_id if exp else self.client.create_experiment(t.mlflow_experiment)
            )
            run = self.client.create_run(
                exp_id,
                run_name=t.run_name or cfg.name,
                tags={
                    "fedrag_ray.mode": mode,
                    "fedrag_ray.method": cfg.train.method,
                    "fedrag_ray.run_dir": str(run_dir.resolve()),
                },
            )
            self.run_id = run.info.run_id
        if t.tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(Path(t.tensorboard_dir or run_dir / "tensorboard")))
        self.log_params(flatten_config(cfg))

    def log_params(self, params: dict[str, str]) -> None:
        if self.client is not None:
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), MLFLOW_PARAM_BATCH):
                self.client.log_batch(self.run_id, params=items[i : i + MLFLOW_PARAM_BATCH])
        if self.writer is not None:
            table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
            self.writer.add_text("config", "| param | value |\n|---|---|\n" + table, 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not metrics:
            return
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(
                self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()]
            )
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def log_outputs(self, cfg: ExperimentConfig) -> None:
        """results.json, the plots and (``log_model``) the exported model as artifacts."""
        if self.client is None:
            return
        for f in sorted(self.run_dir.glob("*.json")) + sorted(self.run_dir.glob("*.png")):
            self.client.log_artifact(self.run_id, str(f))
        if cfg.tracking.log_model and (self.run_dir / "trainable_state.npz").exists():
            target = self.run_dir / "export"
            export_model(self.run_dir, target, in_child=self.mode == "federated")
            self.client.log_artifacts(self.run_id, str(target), "model")

    def close(self, ok: bool) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
        if self.writer is not None:
            self.writer.close()


def export_model(run_dir: Path, target: Path, in_child: bool) -> None:
    """``export_run`` without the store. ``in_child``: in a fresh (spawned) process, so a
    federated driver, which holds arrays and never a model, still never imports torch or
    loads the generator; the model lives in that process for the export only."""
    if not in_child:
        from fedrag_ray.export import export_run

        export_run(run_dir, target, store=False)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_export_in_child, str(run_dir), str(target)).result()


def _export_in_child(run_dir: str, target: str) -> None:
    from fedrag_ray.export import export_run

    export_run(run_dir, target, store=False)


def _run_dir(output: str | Path | None) -> Path:
    """The run's directory: tracking needs one even when no --output was given."""
    path = Path(output) if output else Path(tempfile.mkdtemp(prefix="fedrag-ray-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def track_centralized(
    run: Callable[..., dict[str, Any]],
    cfg: ExperimentConfig,
    output: str | Path | None,
    on_step: Callable[[int, float], None] | None,
    on_phase: Callable[[str], None] | None,
) -> dict[str, Any]:
    """``run`` (the centralized run) with tracking around it; ``run`` itself when off."""
    if not (cfg.tracking.mlflow_uri or cfg.tracking.tensorboard):
        return run(cfg, output, on_step, on_phase)
    run_dir = _run_dir(output)
    tracker = RunTracker(cfg, run_dir, "centralized")

    def step(s: int, loss: float) -> None:
        tracker.log_metrics({"train_loss": float(loss)}, s)
        if on_step:
            on_step(s, loss)

    ok = False
    try:
        results = run(cfg, run_dir, step, on_phase)
        tracker.log_metrics(numeric_metrics(results["metrics_before"]), 0)
        tracker.log_metrics(numeric_metrics(results["metrics_after"]), int(results["steps"]))
        tracker.log_metrics(
            {f"time/{k}": v for k, v in numeric_metrics(results["timings"]).items()},
            int(results["steps"]),
        )
        tracker.log_outputs(cfg)
        ok = True
    finally:
        tracker.close(ok)
    results["output"] = str(run_dir)
    if tracker.run_id:
        results["mlflow_run_id"] = tracker.run_id
    return results


def track_federated(
    run: Callable[..., dict[str, Any]],
    cfg: ExperimentConfig,
    output: str | Path | None,
    on_round: Callable[[dict[str, Any]], None] | None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``run`` (the federated run) with tracking around it; ``run`` itself when off.

    ``keep_rounds``: the server writes its checkpoint (the round's global arrays) right
    before it reports the round, so each report copies those arrays to
    ``RUN_DIR/rounds/round_NNNN.npz``."""
    if not tracking_enabled(cfg):
        return run(cfg, output, on_round=on_round, **kwargs)
    from fedrag_ray.export import checkpoint_arrays, round_state_path

    run_dir = _run_dir(output)
    logs = bool(cfg.tracking.mlflow_uri or cfg.tracking.tensorboard)
    tracker = RunTracker(cfg, run_dir, "federated") if logs else None

    def report(row: dict[str, Any]) -> None:
        server_round = int(row["round"])
        if cfg.tracking.keep_rounds and server_round > 0:
            saved, arrays = checkpoint_arrays(run_dir)
            if saved != server_round:
                raise RuntimeError(
                    f"tracking.keep_rounds: checkpoint holds round {saved} when round "
                    f"{server_round} was reported"
                )
            atomic_write_bytes(round_state_path(run_dir, server_round), npz_bytes(arrays))
        if tracker is not None:
            tracker.log_metrics(numeric_metrics(row), server_round)
        if on_round:
            on_round(row)

    ok = False
    try:
        results = run(cfg, run_dir, on_round=report, **kwargs)
        if tracker is not None:
            tracker.log_outputs(cfg)
        ok = True
    finally:
        if tracker is not None:
            tracker.close(ok)
    if tracker is not None and tracker.run_id:
        results["mlflow_run_id"] = tracker.run_id
    return results
