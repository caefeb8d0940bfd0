"""Ray Tune sweeps where each trial is a whole federated simulation (or centralized run).

The search space (``tune.space`` in the YAML, dotted config keys) may vary fine-tuning
hyper-parameters *and* topology: ``federation.num_clients``, ``federation.partition.alpha``,
``federation.knowledge``, ``federation.strategy.name``...

Nested Ray, done right. A trial reserves a placement group sized from *its own* topology:
one bundle for the trial driver (ServerApp + server-side evaluation) and one bundle per
client actor (``min(clients per round, tune.max_actors_per_trial)``). Tune schedules the
trial's child tasks into that group, and fedrag_ray's Flower backend builds an actor pool
of exactly that many actors (``federation.num_actors``) instead of sizing it from the whole
cluster (which deadlocks in round 1) and does not call ``ray.shutdown()`` at the end
(which would kill the trial). Each trial reports after every federated round, so ASHA
can stop a bad trial early.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from fedrag_ray.config import (
    ConfigError,
    StrictModel,
    SweepTrackingConfig,
    apply_overrides,
    config_from_dict,
    load_raw,
    recall_metric_names,
)


class Dimension(StrictModel):
    type: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    """Sampling of this dimension: `choice`, `grid`, `uniform`, `loguniform` or `randint`."""
    values: list[Any] | None = None
    """Values for `choice` / `grid`."""
    low: float | None = None
    """Lower bound for `uniform` / `loguniform` / `randint`."""
    high: float | None = None
    """Upper bound for `uniform` / `loguniform` / `randint`."""


class SchedulerConfig(StrictModel):
    name: Literal["asha", "fifo"] = "asha"
    """Trial scheduler: `asha` (early stopping by round) or `fifo`."""
    grace_period: int = Field(1, ge=1)
    """Rounds a trial runs before ASHA may stop it."""
    reduction_factor: float = Field(2.0, gt=1.0)
    """ASHA's halving rate."""


class TuneConfig(StrictModel):
    metric: str = "accuracy"
    """Reported metric the sweep ranks trials by (e.g. `accuracy`, `recall@5`, `train_loss`)."""
    mode: Literal["max", "min"] = "max"
    """Whether `max` or `min` of the metric is best."""
    space: dict[str, Dimension]
    """Dotted config keys (e.g. `train.lr`) mapped to their search dimension."""
    search_alg: Literal["random", "grid"] = "random"
    """`random` sampling or a full `grid`."""
    num_samples: int = Field(1, ge=1)
    """Samples drawn (random) or grid repeats."""
    scheduler: SchedulerConfig = SchedulerConfig()
    """Trial scheduler."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials run at once; unset: as the cluster allows."""
    max_actors_per_trial: int = Field(1, ge=1)
    """Client actors per trial (each trial's placement group)."""
    trial_driver_cpus: float = Field(1.0, gt=0.0)
    """CPUs reserved for each trial's driver."""
    tracking: SweepTrackingConfig = SweepTrackingConfig()
    """Per-trial tracking."""


def parse_tune_config(raw: dict[str, Any]) -> TuneConfig:
    if not raw.get("tune"):
        raise ConfigError("tune: this command needs a tune: section with a search space")
    try:
        tc = TuneConfig.model_validate(raw["tune"])
    except ValidationError as err:
        lines = ["invalid config:"]
        for e in err.errors():
            path = "tune." + ".".join(str(p) for p in e["loc"])
            lines.append(f"  {path}: {e['msg']}")
        raise ConfigError("\n".join(lines)) from None
    for key, dim in tc.space.items():
        where = f"tune.space.{key}"
        if dim.type in ("choice", "grid") and not dim.values:
            raise ConfigError(f"{where}: type {dim.type} needs a non-empty values list")
        if dim.type in ("uniform", "loguniform", "randint") and (
            dim.low is None or dim.high is None
        ):
            raise ConfigError(f"{where}: type {dim.type} needs low and high")
        if tc.search_alg == "grid" and dim.type != "grid":
            raise ConfigError(f"{where}: search_alg grid needs every dimension of type grid")
    # every swept key must be a valid config field: validate one sample up front
    probe = {k: (d.values[0] if d.values else d.low) for k, d in tc.space.items()}
    for k, d in tc.space.items():
        if d.type == "randint":
            probe[k] = int(d.low)
    config_from_dict(apply_overrides(_without_tune(raw), probe), source="(tune.space sample)")
    return tc


def _without_tune(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k != "tune"}


def to_search_space(tc: TuneConfig) -> dict[str, Any]:
    from ray import tune

    space = {}
    for key, d in tc.space.items():
        if d.type == "choice":
            space[key] = tune.choice(d.values)
        elif d.type == "grid":
            space[key] = tune.grid_search(d.values)
        elif d.type == "uniform":
            space[key] = tune.uniform(d.low, d.high)
        elif d.type == "loguniform":
            space[key] = tune.loguniform(d.low, d.high)
        else:
            space[key] = tune.randint(int(d.low), int(d.high))
    return space


def trial_actor_count(raw: dict[str, Any], tc: TuneConfig) -> int:
    fed = raw.get("federation")
    if not fed:
        return 0
    sampled = fed.get("clients_per_round") or fed.get("num_clients", 8)
    return max(1, min(int(sampled), tc.max_actors_per_trial))


def trial_resources(base_raw: dict[str, Any], tc: TuneConfig):  # -> callable
    """Placement group per trial sized from the trial's own topology."""
    from ray.tune import PlacementGroupFactory

    def resources(params: dict[str, Any]) -> PlacementGroupFactory:
        raw = apply_overrides(base_raw, params)
        bundles = [{"CPU": tc.trial_driver_cpus}]
        fed = raw.get("federation")
        if fed:
            res = fed.get("client_resources") or {}
            bundle = {"CPU": float(res.get("num_cpus", 1.0))}
            if res.get("num_gpus"):
                bundle["GPU"] = float(res["num_gpus"])
            bundle.update({k: float(v) for k, v in (res.get("custom") or {}).items()})
            bundles += [bundle] * trial_actor_count(raw, tc)
        return PlacementGroupFactory(bundles, strategy="PACK")

    return resources


def metric_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class RoundReporter:
    """What a trial reports per round: the round's numbers, plus those of the last
    evaluated round that this round lacks. With ``federation.eval_every > 1`` most rounds
    are not evaluated, and a row without ``tune.metric`` makes Tune stop the sweep;
    round 0 (the initial evaluation) seeds the carried values. ``evaluated_round`` says
    which round the evaluation metrics of a report were measured in."""

    def __init__(self) -> None:
        self.last_eval: dict[str, Any] = {}

    def __call__(self, row: dict[str, Any]) -> dict[str, Any] | None:
        numbers = metric_row(row)
        if "eval_seconds" in row or row["round"] == 0:
            self.last_eval = {k: v for k, v in numbers.items() if k != "eval_seconds"}
            self.last_eval["evaluated_round"] = row["round"]
        if row["round"] == 0:
            return None
        return {**self.last_eval, **numbers}


def run_trial(params: dict[str, Any], base_raw: dict[str, Any], tc: TuneConfig) -> None:
    """One trial: the experiment with this trial's overrides, reporting every round."""
    from ray import tune

    from fedrag_ray.runtime import configure_process

    raw = apply_overrides(base_raw, params)
    if raw.get("federation"):
        raw["federation"]["num_actors"] = trial_actor_count(raw, tc)
    cfg = config_from_dict(raw)
    configure_process(threads=max(1, int(tc.trial_driver_cpus)))
    out = Path(tune.get_context().get_trial_dir()) / "run"
    (out.parent / "config.yaml").write_text(yaml.safe_dump(_best_config_raw(raw), sort_keys=False))
    if cfg.federation is not None:
        from fedrag_ray.federated.simulation import run_federated

        reporter = RoundReporter()

        def on_round(row: dict[str, Any]) -> None:
            if (report := reporter(row)) is not None:
                tune.report(report)

        run_federated(cfg, out, on_round=on_round)
    else:
        from fedrag_ray.centralized import run_centralized

        res = run_centralized(cfg, out)
        tune.report({**metric_row(res["metrics_after"]), "round": 1})


def _best_config_raw(raw: dict[str, Any]) -> dict[str, Any]:
    """A config `fedrag-ray simulate` accepts as is: no tune section, no trial-only keys."""
    out = _without_tune(raw)
    if out.get("federation"):
        out["federation"] = {k: v for k, v in out["federation"].items() if k != "num_actors"}
    return out


def run_sweep(
    config: str,
    output: Path | None,
    address: str | None = None,
    resume: bool = False,
    num_cpus: int | None = None,
    overrides: dict[str, Any] | None = None,
    console: Any = None,
) -> dict[str, Any]:
    import ray

    from fedrag_ray.compat import check_versions

    check_versions()
    raw = load_raw(config)
    if overrides:
        raw = apply_overrides(raw, overrides)
    tc = parse_tune_config(raw)
    base_raw = _without_tune(raw)
    config_from_dict(base_raw)  # the base must be valid on its own
    output = Path(output or "runs/sweep").resolve()
    output.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

    swept = set(tc.space)
    if not any(k.startswith(("retriever.", "knowledge_store.", "data.")) for k in swept):
        _share_global_store(base_raw, output)

    from fedrag_ray.federated.ray_head import start_or_join_ray

    started = start_or_join_ray(address, num_cpus)
    try:
        grid = _tuner(tc, base_raw, output, resume).fit()
    finally:
        if started:
            ray.shutdown()
    return _write_results(grid, tc, base_raw, output, console)


def _tuner(tc: TuneConfig, base_raw: dict[str, Any], output: Path, resume: bool) -> Any:
    """The sweep's Tuner: restored from ``output/sweep`` on resume, else a fresh one."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_raw=base_raw, tc=tc),
        trial_resources(base_raw, tc),
    )
    path = output / "sweep"
    if resume and tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=to_search_space(tc),
        tune_config=tune.TuneConfig(
            metric=tc.metric,
            mode=tc.mode,
            num_samples=tc.num_samples,
            scheduler=_scheduler(tc, base_raw),
            max_concurrent_trials=tc.max_concurrent_trials,
        ),
        run_config=tune.RunConfig(
            name="sweep",
            storage_path=str(output),
            callbacks=_tracking_callbacks(tc),
            verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )


def _share_global_store(base_raw: dict[str, Any], output: Path) -> None:
    """Embed the corpus once for the whole sweep instead of once per trial; a store left
    by an earlier sweep is reused only if built from the same inputs
    (``provenance.ensure_store``; only the passage encoder is loaded to check)."""
    from fedrag_ray.data import load_dataset_from_config
    from fedrag_ray.provenance import ensure_store, store_provenance
    from fedrag_ray.rag import RAGSystem
    from fedrag_ray.retriever import BiEncoderRetriever

    path = output / "global_store"
    base_raw.setdefault("knowledge_store", {})["path"] = str(path)
    cfg = config_from_dict(apply_overrides(base_raw, {"train.method": "ralt"}))
    data = load_dataset_from_config(cfg.data)
    encoder = BiEncoderRetriever(cfg.retriever.model_copy(update={"train": "none"}))
    ensure_store(
        path,
        store_provenance(encoder, data.passages, cfg.knowledge_store),
        lambda: RAGSystem(cfg).build_store(data.passages),
        f"delete {path} to rebuild it",
    )


def _scheduler(tc: TuneConfig, base_raw: dict[str, Any]) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tc.scheduler.name == "fifo":
        return FIFOScheduler()
    fed = base_raw.get("federation") or {}
    max_t = max(int(fed.get("rounds", 3)), tc.scheduler.grace_period)
    if "federation.rounds" in tc.space:
        max_t = max(max_t, *[int(v) for v in tc.space["federation.rounds"].values or [max_t]])
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_t,
        grace_period=tc.scheduler.grace_period,
        reduction_factor=tc.scheduler.reduction_factor,
    )


def _tracking_callbacks(tc: TuneConfig) -> list[Any]:
    """CSV + JSON always (the per-round history is read back from them); TensorBoard and
    MLflow only when the config asks (auto-added loggers are switched off)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    callbacks: list[Any] = [CSVLoggerCallback(), JsonLoggerCallback()]
    if tc.tracking.tensorboard:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    if tc.tracking.mlflow_uri:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(
            MLflowLoggerCallback(
                tracking_uri=tc.tracking.mlflow_uri, experiment_name=tc.tracking.mlflow_experiment
            )
        )
    return callbacks


def _trial_row(result: Any, tc: TuneConfig, base_raw: dict[str, Any]) -> dict[str, Any]:
    """One trial of the sweep: its parameters, final metric and per-round history."""
    params = {k: result.config.get(k) for k in tc.space}
    history = []
    if result.metrics_dataframe is not None and len(result.metrics_dataframe):
        history = json.loads(result.metrics_dataframe.to_json(orient="records"))
    final = result.metrics or {}
    k_values = config_from_dict(base_raw).eval.k_values
    keys = ("round", tc.metric, "evaluated_round", "train_loss", "seconds")
    keys += tuple(recall_metric_names(k_values))
    return {
        "trial": Path(result.path).name,
        "params": params,
        "metric": final.get(tc.metric),
        "rounds_reported": len(history),
        "stopped_early": result.error is None
        and len(history) < _expected_reports(base_raw, params),
        "error": str(result.error) if result.error else None,
        "history": [{k: h.get(k) for k in dict.fromkeys(keys)} for h in history],
    }


def _write_results(
    grid: Any, tc: TuneConfig, base_raw: dict[str, Any], output: Path, console: Any
) -> dict[str, Any]:
    """Rank the trials; write ``tune_results.{json,csv,png}`` and ``best_config.yaml``."""
    from fedrag_ray.atomic import atomic_write_bytes, atomic_write_json

    rows = [_trial_row(result, tc, base_raw) for result in grid]
    ranked = sorted(
        rows,
        key=lambda r: (r["metric"] is None or _nan(r["metric"]), _rank_key(r["metric"], tc.mode)),
    )
    best = ranked[0] if ranked and ranked[0]["metric"] is not None else None
    summary = {"metric": tc.metric, "mode": tc.mode, "trials": ranked, "best": best}
    atomic_write_json(output / "tune_results.json", summary)
    _write_csv(ranked, tc, output / "tune_results.csv")
    if best is not None:
        best_raw = _best_config_raw(apply_overrides(base_raw, best["params"]))
        best_raw.get("knowledge_store", {}).pop("path", None)
        atomic_write_bytes(
            output / "best_config.yaml", yaml.safe_dump(best_raw, sort_keys=False).encode()
        )
    _plot(ranked, tc, output / "tune_results.png")
    if console is not None:
        console.print(_table(ranked, tc))
        if best is not None:
            console.print(f"best: {best['params']} → {tc.metric} {best['metric']:.4f}")
            console.print(f"best config: {output / 'best_config.yaml'}")
    return summary


def _write_csv(ranked: list[dict[str, Any]], tc: TuneConfig, path: Path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "trial", *tc.space, tc.metric, "rounds_reported", "error"])
        for i, r in enumerate(ranked, 1):
            writer.writerow(
                [
                    i,
                    r["trial"],
                    *[r["params"][k] for k in tc.space],
                    r["metric"],
                    r["rounds_reported"],
                    r["error"] or "",
                ]
            )


def _expected_reports(base_raw: dict[str, Any], params: dict[str, Any]) -> int:
    raw = apply_overrides(base_raw, params)
    return int((raw.get("federation") or {}).get("rounds", 1))


def _nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _rank_key(metric: Any, mode: str) -> float:
    if metric is None or _nan(metric):
        return 0.0
    return -float(metric) if mode == "max" else float(metric)


def _table(ranked: list[dict[str, Any]], tc: TuneConfig) -> Any:
    from rich.table import Table

    table = Table(title=f"sweep ranked by {tc.metric} ({tc.mode})")
    table.add_column("rank", justify="right")
    for k in tc.space:
        table.add_column(k)
    table.add_column(tc.metric, justify="right")
    table.add_column("rounds", justify="right")
    table.add_column("status")
    for i, r in enumerate(ranked, 1):
        status = "error" if r["error"] else ("stopped early" if r["stopped_early"] else "done")
        metric = "-" if r["metric"] is None else f"{r['metric']:.4f}"
        table.add_row(
            str(i),
            *[str(r["params"][k]) for k in tc.space],
            metric,
            str(r["rounds_reported"]),
            status,
        )
    return table


def _plot(ranked: list[dict[str, Any]], tc: TuneConfig, path: Path) -> None:
    from fedrag_ray.plots import plt

    keys = list(tc.space)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(r["params"][key], r["metric"]) for r in ranked if r["metric"] is not None]
        xs = [p[0] for p in pts]
        if xs and all(isinstance(x, int | float) for x in xs):
            ax.scatter(xs, [p[1] for p in pts])
            if tc.space[key].type == "loguniform":
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], [p[1] for p in pts])
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel(tc.metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
