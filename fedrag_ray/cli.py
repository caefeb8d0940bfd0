"""``fedrag-ray``: train, eval, index build, ask, serve, simulate, tune, export.

Every command runs ``fedrag_ray.preflight`` (config, model names, data files, output
locations, checkpoints) before any model loads or Ray starts, shows progress on long work,
prints a summary table, and with ``--output DIR`` writes ``DIR/results.json`` plus plots.
Known user errors print one line naming the field or file and exit with status 2; an
unexpected error prints one traceback, without local variables (they can hold user data).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fedrag_ray.config import ConfigError, ExperimentConfig, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=__doc__,
    pretty_exceptions_show_locals=False,
)
index_app = typer.Typer(no_args_is_help=True, help="Knowledge-store commands.")
app.add_typer(index_app, name="index")
data_app = typer.Typer(no_args_is_help=True, help="Dataset commands.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)

METRIC_KEYS = [
    "recall@1",
    "recall@5",
    "recall@20",
    "mrr",
    "accuracy",
    "closed_book_accuracy",
    "exact_match",
    "f1",
    "closed_book_exact_match",
    "closed_book_f1",
]


@app.callback()
def _global_options(
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="Show the libraries' warnings and loading bars (also in Ray actors)",
    ),
) -> None:
    """Without --verbose, deprecation notices and per-actor model-loading bars are off."""
    from fedrag_ray.runtime import VERBOSE_ENV

    if verbose:
        os.environ[VERBOSE_ENV] = "1"


USER_ERRORS = [
    ("fedrag_ray.config", "ConfigError"),
    ("fedrag_ray.data", "DataError"),
    ("fedrag_ray.knowledge_store", "KnowledgeStoreError"),
    ("fedrag_ray.federated.resources", "ResourceError"),
    ("fedrag_ray.federated.checkpoint", "CheckpointError"),
]


def _is_user_error(err: BaseException) -> bool:
    """A known user error. Only modules already imported are looked at: an error cannot
    come from a class never loaded, and importing ``fedrag_ray.federated`` (Flower, Ray)
    just to check would cost seconds on every failing command."""
    classes: list[type[BaseException]] = [FileNotFoundError]
    for module, name in USER_ERRORS:
        if module in sys.modules:
            classes.append(getattr(sys.modules[module], name))
    return isinstance(err, tuple(classes))


def _parse_sets(sets: list[str] | None) -> dict[str, Any]:
    import yaml

    out = {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set expects section.field=value, got {item!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            from fedrag_ray.config import yaml_problem

            raise ConfigError(
                f"--set {key}: value {value!r} is not valid YAML ({yaml_problem(err)})"
            ) from None
    return out


def _load(config: str, sets: list[str] | None) -> ExperimentConfig:
    from fedrag_ray.runtime import quiet_this_process

    quiet_this_process()  # before tqdm / huggingface_hub / transformers are imported
    return load_config(config, _parse_sets(sets))


def _preflight(cfg: ExperimentConfig, **kwargs: Any) -> Any:
    from fedrag_ray.preflight import preflight

    return preflight(cfg, **kwargs)


def _run(fn: Any) -> None:
    try:
        fn()
    except Exception as err:
        if not _is_user_error(err):
            from fedrag_ray.runtime import verbose

            if not verbose():  # one traceback: the chain of causes only with --verbose
                err.__cause__, err.__suppress_context__ = None, True
            raise
        # one line, as written (no markup, no wrapping): scripts and tests grep it
        console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _with_interval(metrics: dict[str, Any], key: str) -> str:
    """``0.312 [0.283, 0.341]`` when the run measured the interval, else the value."""
    v = metrics.get(key)
    lo, hi = metrics.get(f"{key}_lo"), metrics.get(f"{key}_hi")
    if isinstance(v, float) and isinstance(lo, float) and isinstance(hi, float):
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
    return _fmt(v)


def _summary_table(
    title: str,
    before: dict[str, Any],
    after: dict[str, Any],
    gain: dict[str, dict[str, Any]] | None = None,
) -> Table:
    """Before / after with 95% bootstrap intervals, and the paired gain (same questions)
    with its interval; a gain whose interval excludes 0 is marked as significant."""
    gain = gain or {}
    level = next(iter(gain.values()), {}).get("confidence", 0.95)
    table = Table(
        title=title,
        caption=f"in brackets: {level:.0%} bootstrap intervals over the questions; "
        "* the paired interval excludes 0",
    )
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("gain (paired)", justify="right")
    for k in METRIC_KEYS:
        if k in before or k in after:
            b, a = before.get(k), after.get(k)
            g = gain.get(k)
            if g:
                mark = " *" if g["excludes_zero"] else ""
                delta = f"{g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]{mark}"
            elif isinstance(a, float) and isinstance(b, float):
                delta = f"{a - b:+.3f}"
            else:
                delta = ""
            table.add_row(k, _with_interval(before, k), _with_interval(after, k), delta)
    return table


class _RateColumn(ProgressColumn):
    """Items per second (or seconds per item when slower than one a second)."""

    def render(self, task: Any) -> Any:
        from rich.text import Text

        speed = task.finished_speed or task.speed
        if not speed:
            return Text("")
        return Text(f"{speed:.2f}/s" if speed >= 1 else f"{1 / speed:.1f}s/it")


def _progress() -> Progress:
    """Count, rate and ETA of long work, drawn only on a terminal: piped into a file or
    a CI log, rich would print every refresh, so there the phases are plain log lines
    (``_phase_logger``) and the bars stay off."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


class _StageBar:
    """A ``progress(stage, done, total)`` callback (``fedrag_ray.progress``) that drives
    one bar: a new stage (or ``done`` back at 0) restarts it, so its rate and ETA are the
    stage's own. Without a terminal each stage is one log line and nothing else."""

    def __init__(self, progress: Progress, task: Any) -> None:
        self.progress, self.task = progress, task
        self.stage: str | None = None

    def __call__(self, stage: str, done: int, total: int, info: str = "") -> None:
        if stage != self.stage or done == 0:
            self.stage = stage
            self.progress.reset(self.task, total=total, completed=done, description=stage)
            if not console.is_terminal:
                console.log(f"{stage}: {total}")
        self.progress.update(self.task, completed=done, total=total, info=info)


def _phase_logger(progress: Progress, task: Any) -> Any:
    """Phase names go into the progress bar; without a terminal (CI, logs) also one line
    each, since rich draws no live bar there."""

    def on_phase(message: str) -> None:
        progress.update(task, description=message)
        if not console.is_terminal:
            console.log(message)

    return on_phase


Sets = typer.Option(None, "--set", help="Override a config field: --set train.lr=1e-3")


@app.command()
def train(
    config: str = typer.Argument(..., help="YAML config path or bundled config name"),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write results here"),
    set_: list[str] | None = Sets,
) -> None:
    """Centralized fine-tuning (RALT, LSR or both) with before/after evaluation."""

    def go() -> None:
        cfg = _load(config, set_)
        data = _preflight(cfg, output=output)
        from fedrag_ray.centralized import run_centralized

        per_epoch = math.ceil(len(data.train) / cfg.train.batch_size)
        total = cfg.train.max_steps or per_epoch * cfg.train.epochs
        with _progress() as progress:
            task = progress.add_task("starting", total=total, info="")
            bar = _StageBar(progress, task)
            res = run_centralized(
                cfg,
                output,
                on_step=lambda s, loss: bar("training steps", s, total, f"loss {loss:.4f}"),
                on_phase=_phase_logger(progress, task),
                progress=bar,
            )
        console.print(
            _summary_table(
                f"{cfg.name}: {cfg.train.method}, {res['steps']} steps",
                res["metrics_before"],
                res["metrics_after"],
                res.get("gain"),
            )
        )
        _print_headline_gain(res.get("gain", {}))
        console.print(
            f"time: {res['timings']['total_s']:.1f}s (train {res['timings']['train_s']:.1f}s)"
        )
        if output:
            console.print(f"results: {output / 'results.json'}")

    _run(go)


@app.command("eval")
def eval_(
    config: str = typer.Argument(...),
    state: Path | None = typer.Option(None, help="trainable_state.npz from a train/simulate run"),
    output: Path | None = typer.Option(None, "--output", "-o"),
    closed_book: bool = typer.Option(False, help="Answer without retrieved passages"),
    federated: bool = typer.Option(
        False, help="Each client searches its own knowledge; compare the merge with central"
    ),
    address: str | None = typer.Option(None, help="--federated: join a Ray cluster"),
    set_: list[str] | None = Sets,
) -> None:
    """Evaluate retrieval (recall@k, MRR) and answers (accuracy, EM, F1) on held-out data.
    With --federated: merged federated retrieval vs central retrieval (same corpus)."""

    def go() -> None:
        cfg = _load(config, set_)
        data = _preflight(cfg, output=output, state=state, needs_federation=federated)
        if federated:
            _federated_eval(cfg, output, address)
            return

        from fedrag_ray.centralized import eval_examples, prepare_store
        from fedrag_ray.evaluate import evaluate
        from fedrag_ray.rag import RAGSystem
        from fedrag_ray.runtime import configure_process
        from fedrag_ray.service import load_state

        configure_process()
        with console.status("loading models"):
            system = RAGSystem(cfg)
            if state:
                load_state(system, state)
        held = eval_examples(cfg, data)
        with _progress() as progress:
            bar = _StageBar(progress, progress.add_task("indexing", total=None, info=""))
            store = prepare_store(system, data, bar)
            metrics = evaluate(system, held, store, closed_book=closed_book, progress=bar)
        title = f"{cfg.name}: evaluation ({int(metrics['n'])} questions)"
        _show_metrics(cfg, title, "metrics", metrics, output)

    _run(go)


def _federated_eval(cfg: ExperimentConfig, output: Path | None, address: str | None) -> None:
    from fedrag_ray.data import eval_examples, load_dataset_from_config
    from fedrag_ray.federated.federated_retrieval import eval_inference, run_federated_retrieval

    if cfg.federation is None:
        raise ConfigError("federation: eval --federated needs a federation: section")
    held = eval_examples(cfg, load_dataset_from_config(cfg.data))
    hook = eval_inference([e.question for e in held], [e.gold_doc_ids for e in held], [1, 5, 10])
    with console.status("federated retrieval vs central"):
        res = run_federated_retrieval(cfg, hook, output, address=address)
    title = f"{cfg.name}: federated retrieval ({cfg.federation.retrieval.merge})"
    _show_metrics(cfg, title, "federated_eval", res["federated_eval"], output)


def _show_metrics(
    cfg: ExperimentConfig, title: str, key: str, metrics: dict[str, Any], output: Path | None
) -> None:
    """An evaluation's metrics as a table, and in ``output/results.json`` under ``key``."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, _fmt(v))
    console.print(table)
    if output:
        from fedrag_ray.atomic import atomic_write_json

        output.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            output / "results.json", {key: metrics, "config": cfg.model_dump(mode="json")}
        )


@index_app.command("build")
def index_build(
    config: str = typer.Argument(...),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Store directory (default: knowledge_store.path)"
    ),
    set_: list[str] | None = Sets,
) -> None:
    """Embed the corpus and save a FAISS knowledge store (atomic, versioned directory)."""

    def go() -> None:
        import time

        cfg = _load(config, set_)
        target = output or (Path(cfg.knowledge_store.path) if cfg.knowledge_store.path else None)
        if target is None:
            raise ConfigError("knowledge_store.path: set it in the config or pass --output")
        from fedrag_ray.preflight import check_writable

        data = _preflight(cfg)
        check_writable(target, "--output" if output else "knowledge_store.path")
        from fedrag_ray.knowledge_store import KnowledgeStore
        from fedrag_ray.provenance import store_provenance
        from fedrag_ray.retriever import BiEncoderRetriever
        from fedrag_ray.runtime import configure_process

        configure_process()
        retriever = BiEncoderRetriever(cfg.retriever.model_copy(update={"train": "none"}))
        ks = cfg.knowledge_store
        store = KnowledgeStore.from_config(retriever.dim, ks)
        t = time.perf_counter()
        batch = 256
        with _progress() as progress:
            task = progress.add_task("embedding passages", total=len(data.passages), info="")
            for i in range(0, len(data.passages), batch):
                chunk = data.passages[i : i + batch]
                store.add(chunk, retriever.encode_passages([p.text for p in chunk]))
                progress.update(task, advance=len(chunk))
        store.provenance = store_provenance(retriever, data.passages, ks)
        store.save(target)
        table = Table(title="knowledge store")
        table.add_column("field")
        table.add_column("value")
        for k, v in [
            ("path", target),
            ("passages", len(store)),
            ("dim", store.dim),
            ("index", ks.index),
            ("shards", ks.n_shards),
            ("seconds", f"{time.perf_counter() - t:.1f}"),
        ]:
            table.add_row(k, str(v))
        console.print(table)

    _run(go)


def _federated_ask(
    cfg: ExperimentConfig, question: str, state: Path | None, address: str | None
) -> None:
    """``ask --federated``: every client searches its own knowledge, the server merges."""
    import numpy as np

    from fedrag_ray.federated.federated_retrieval import ask_inference, run_federated_retrieval

    if cfg.federation is None:
        raise ConfigError("federation: ask --federated needs a federation: section")
    arrays = dict(np.load(state)) if state else None
    k = cfg.rag.generate_passages
    with console.status("federated retrieval"):
        res = run_federated_retrieval(cfg, ask_inference([question], k, arrays), address=address)
    fr = res["federated_retrieval"]
    merged, texts = fr["merged"][0], fr["merged_texts"][0]
    used = fr["answers"][0]["passages_used"]
    print(
        json.dumps(
            {
                "answer": fr["answers"][0]["answer"],
                "merge": cfg.federation.retrieval.merge,
                "clients": fr["clients"],
                "failed_clients": fr["failed"],
                "sources": [
                    {**hit, "text": text[:200]}
                    for hit, text in zip(merged[:used], texts[:used], strict=True)
                ],
            },
            indent=2,
        )
    )


@app.command()
def ask(
    config: str = typer.Argument(..., help="YAML config path or bundled config name"),
    question: str | None = typer.Argument(None, help="The question (or --interactive)"),
    state: Path | None = typer.Option(None, help="trainable_state.npz to load"),
    interactive: bool = typer.Option(
        False,
        "--interactive",
        "-i",
        help="Load once, then answer questions read from stdin until EOF, an empty line or 'exit'",
    ),
    threads: int = typer.Option(
        1,
        min=1,
        help="torch threads. One question is many small matrix products; with more "
        "threads each waits for the others, and on a busy machine that wait dominates",
    ),
    federated: bool = typer.Option(
        False, help="Search every client's private knowledge and merge (needs federation:)"
    ),
    address: str | None = typer.Option(None, help="--federated: join a Ray cluster"),
    set_: list[str] | None = Sets,
) -> None:
    """Answer a question with the RAG pipeline and show the passages it used (JSON on
    stdout). The knowledge store is built once and reused: knowledge_store.path, the
    run directory's own store next to --state, or a provenance-checked cache entry."""

    def go() -> None:
        cfg = _load(config, set_)
        if interactive and federated:
            raise ConfigError("--interactive: not with --federated (one Ray run per question)")
        if not interactive and not (question or "").strip():
            raise ConfigError("QUESTION: give a question, or --interactive to read them")
        _preflight(cfg, state=state, needs_federation=federated, load_data=False)
        if federated:
            _federated_ask(cfg, question or "", state, address)
            return
        if cfg.knowledge_store.serve == "actors":
            _served_ask(cfg, question or "", state)
            return
        from fedrag_ray.service import Answerer

        with console.status("loading data, models and the knowledge store") as status:
            answerer = Answerer(
                cfg,
                state,
                run_dir=state.parent if state else None,
                on_phase=lambda m: status.update(m),
                threads=threads,
            )
        if not interactive:
            print(json.dumps(answerer.ask(question or ""), indent=2), flush=True)
            return
        _ask_loop(answerer, question)

    _run(go)


EXIT_WORDS = ("exit", "quit", ":q")


def _ask_loop(answerer: Any, first: str | None) -> None:
    """``ask --interactive``: one JSON answer per line read; the prompt and timings go to
    stderr, so stdout stays a stream of answers a script can read."""
    import time

    console.print(
        f"ready in {answerer.load_seconds:.1f}s; ask away (empty line, 'exit' or EOF ends)",
        highlight=False,
    )
    pending = [first] if first and first.strip() else []
    while True:
        if pending:
            line = pending.pop()
        else:
            sys.stderr.write("question> ")
            sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:  # EOF
                break
        line = line.strip()
        if not line or line.lower() in EXIT_WORDS:
            break
        t = time.perf_counter()
        record = answerer.ask(line)
        print(json.dumps(record, indent=2), flush=True)
        console.print(f"answered in {time.perf_counter() - t:.2f}s", highlight=False)


def _served_ask(cfg: ExperimentConfig, question: str, state: Path | None) -> None:
    """``knowledge_store.serve: actors``: the store's shard actors answer the search."""
    from fedrag_ray import index_service
    from fedrag_ray.data import load_dataset_from_config
    from fedrag_ray.federated.knowledge import ensure_global_store
    from fedrag_ray.rag import RAGSystem
    from fedrag_ray.runtime import configure_process
    from fedrag_ray.service import answer_record, load_state

    if not cfg.knowledge_store.path:
        raise ConfigError("knowledge_store.path: serve: actors needs a saved store")
    configure_process()
    data = load_dataset_from_config(cfg.data)
    system = RAGSystem(cfg)
    if state:
        load_state(system, state)
    path = Path(cfg.knowledge_store.path)
    ensure_global_store(system, data.passages, path)
    with index_service.serving(path, cfg.knowledge_store.serve_cpus) as served:
        system.store = served
        ans = system.answer(question)
    print(json.dumps(answer_record(ans), indent=2))


def _round_line(row: dict[str, Any]) -> str:
    if row["round"] == 0:
        parts = ["round 0 (before training): "]
    else:
        parts = [
            f"round {row['round']}: {row['succeeded']}/{row['sampled']} clients ok",
            f"loss {_fmt(row.get('train_loss'))}",
            f"{(row['bytes_sent'] + row['bytes_received']) / 1024:.0f} KiB",
            f"{row['seconds']:.1f}s",
        ]
        if row.get("epsilon") is not None:  # differential privacy spent so far
            parts.append(f"ε {row['epsilon']:.3g} at δ {row['delta']:g}")
    parts += [
        f"{k} {_fmt(row[k])}" for k in ("recall@5", "accuracy", "exact_match", "f1") if k in row
    ]
    return " | ".join(parts)


@app.command()
def simulate(
    config: str = typer.Argument(...),
    output: Path | None = typer.Option(None, "--output", "-o"),
    address: str | None = typer.Option(None, help="Join a Ray cluster: auto or HOST:PORT"),
    resume: Path | None = typer.Option(None, help="Resume the run in this directory"),
    num_cpus: int | None = typer.Option(None, help="CPUs for an embedded local Ray"),
    set_: list[str] | None = Sets,
) -> None:
    """Federated fine-tuning simulated with Flower on Ray (needs a federation: section)."""

    def go() -> None:
        cfg = _load(config, set_)
        out = resume or output
        _preflight(cfg, output=out, resume=resume, needs_federation=True)
        from fedrag_ray.federated import run_federated

        assert cfg.federation is not None  # checked by the preflight
        with _progress() as progress:
            task = progress.add_task("starting", total=cfg.federation.rounds, info="")
            clients = _StageBar(progress, progress.add_task("clients", total=None, info=""))

            def on_round(row: dict[str, Any]) -> None:
                progress.console.print(_round_line(row))
                progress.update(task, completed=row["round"], description="federated rounds")

            res = run_federated(
                cfg,
                out,
                address=address,
                resume=resume is not None,
                on_round=on_round,
                on_phase=_phase_logger(progress, task),
                num_cpus=num_cpus,
                progress=clients,
            )
        fed = cfg.federation
        title = (
            f"{cfg.name}: {cfg.train.method}, {fed.num_clients} clients, {fed.rounds} rounds, "
            f"{fed.strategy.name}"
        )
        console.print(
            _summary_table(title, res["metrics_before"], res["metrics_after"], res.get("gain"))
        )
        _print_headline_gain(res.get("gain", {}))
        console.print(
            f"bytes/round {res['bytes_per_round'] / 1024:.1f} KiB "
            f"(full model {res['full_model_bytes'] / 2**20:.1f} MiB), failures {res['failures']}, "
            f"peak memory {res['peak_rss_bytes'] / 2**30:.2f} GiB, "
            f"total {res['timings']['total_s']:.1f}s"
        )
        console.print(f"results: {Path(res['output']) / 'results.json'}")

    _run(go)


def _print_headline_gain(gain: dict[str, dict[str, Any]]) -> None:
    """One line a person reads first: the main answer metric's paired gain and whether its
    interval excludes 0."""
    key = next((k for k in ("exact_match", "accuracy", "f1") if k in gain), None)
    if key is None:
        return
    g = gain[key]
    verdict = (
        "the interval excludes 0: a measured improvement"
        if g["excludes_zero"] and g["mean"] > 0
        else "the interval includes 0: not distinguishable from no change"
        if not g["excludes_zero"]
        else "the interval excludes 0: a measured loss"
    )
    console.print(
        f"{key} gain {g['mean']:+.3f}, {g.get('confidence', 0.95):.0%} interval "
        f"[{g['lo']:+.3f}, {g['hi']:+.3f}] over {g['n']} questions: {verdict}"
    )


@app.command()
def tune(
    config: str = typer.Argument(...),
    output: Path | None = typer.Option(None, "--output", "-o"),
    address: str | None = typer.Option(None, help="Join a Ray cluster: auto or HOST:PORT"),
    resume: bool = typer.Option(False, help="Continue an interrupted sweep in --output"),
    num_cpus: int | None = typer.Option(None, help="CPUs for an embedded local Ray"),
    set_: list[str] | None = Sets,
) -> None:
    """Ray Tune sweep: each trial is a whole federated (or centralized) run."""

    def go() -> None:
        from fedrag_ray.config import apply_overrides, config_from_dict, load_raw
        from fedrag_ray.tune import _without_tune, parse_tune_config, run_sweep

        raw_overrides = _parse_sets(set_)
        raw = apply_overrides(load_raw(config), raw_overrides)
        parse_tune_config(raw)
        _preflight(config_from_dict(_without_tune(raw), str(config)), output=output)
        run_sweep(
            config,
            output,
            address=address,
            resume=resume,
            num_cpus=num_cpus,
            overrides=raw_overrides,
            console=console,
        )

    _run(go)


@app.command()
def serve(
    run_dir: Path = typer.Argument(..., help="A train / simulate output directory"),
    address: str | None = typer.Option(None, help="Join a Ray cluster: auto or HOST:PORT"),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Override a field of the run's config: --set serve.port=8080"
    ),
) -> None:
    """Serve the fine-tuned system over HTTP on Ray Serve: POST /ask {"question": ...}
    answers with the answer and its sources, GET /health; replicas, CPUs, host and port
    from the config's serve: section. Runs until Ctrl-C."""

    def go() -> None:
        from fedrag_ray.config import apply_overrides, config_from_dict
        from fedrag_ray.runtime import quiet_this_process
        from fedrag_ray.serve import check_serve_installed, run_server
        from fedrag_ray.service import run_config

        quiet_this_process()
        cfg, state = run_config(run_dir)
        if set_:
            raw = apply_overrides(cfg.model_dump(mode="json"), _parse_sets(set_))
            cfg = config_from_dict(raw, f"{run_dir} with --set")
        _preflight(cfg, state=state, load_data=True)
        check_serve_installed()

        status = console.status("starting Ray Serve and loading the system on each replica")
        status.start()

        def ready(url: str) -> None:
            status.stop()
            console.print(
                f"serving {cfg.name} on {url}: POST /ask, GET /health (Ctrl-C stops)",
                highlight=False,
                soft_wrap=True,
            )

        try:
            run_server(cfg, state, run_dir, address, on_ready=ready)
        finally:
            status.stop()
        console.print("stopped", highlight=False)

    _run(go)


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A train / simulate / tune output directory"),
    output: Path = typer.Option(..., "--output", "-o", help="Export directory to write"),
    round_: int | None = typer.Option(
        None, "--round", help="Federated: this round's global model (default: the last)"
    ),
    trial: str | None = typer.Option(None, help="Sweep: this trial (default: the best)"),
    merge: bool = typer.Option(False, help="Also write the generator with its LoRA merged"),
    store: bool = typer.Option(True, help="Include the knowledge store"),
) -> None:
    """Export the fine-tuned model: PEFT adapter (+ merged HF model), sentence-transformers
    query encoder, knowledge store."""

    def go() -> None:
        from fedrag_ray.export import ExportError, export_run
        from fedrag_ray.preflight import check_writable

        if not run_dir.is_dir():
            raise ConfigError(f"RUN_DIR: {run_dir} is not a directory")
        check_writable(output, "--output")
        try:
            with console.status("exporting"):
                manifest = export_run(run_dir, output, round_, trial, merge=merge, store=store)
        except ExportError as err:
            raise ConfigError(str(err)) from None
        table = Table(title=f"export of {manifest['source']['run_dir']}")
        table.add_column("directory")
        table.add_column("format")
        for name, kind in manifest["written"].items():
            table.add_row(str(output / name), kind)
        console.print(table)
        src = manifest["source"]
        where = ", ".join(f"{k} {src[k]}" for k in ("round", "trial") if src[k] is not None)
        console.print(f"exported {src['kind']} run{' (' + where + ')' if where else ''}")

    _run(go)


@data_app.command("download")
def data_download(
    name: str = typer.Argument(..., help="squad or pubmedqa"),
    directory: Path | None = typer.Option(
        None, "--dir", help="Data directory (default: $FEDRAG_RAY_DATA, see `data dir`)"
    ),
    mirror: str | None = typer.Option(
        None, help="Base URL holding the same files (checksums are still verified)"
    ),
    if_missing: bool = typer.Option(
        False, "--if-missing", help="Do nothing when the dataset's files are already there"
    ),
) -> None:
    """Fetch a dataset from its official address, verify its checksum, and install it in
    the data directory the bundled configs read (``data:`` paths)."""

    def go() -> None:
        from fedrag_ray.data import data_dir
        from fedrag_ray.download import DATASETS, download

        ds = DATASETS.get(name)
        root = directory or data_dir()
        if if_missing and ds and all((root / o).exists() for o in ds.outputs):
            console.print(f"{name}: already in {root}")
            return
        with console.status(f"downloading {name}"):
            written = download(name, directory, mirror)
        for p in written:
            console.print(f"wrote {p}")
        if ds:
            console.print(f"licence: {ds.licence}; cite: {ds.citation}")

    _run(go)


@data_app.command("dir")
def data_directory() -> None:
    """Print the data directory (``$FEDRAG_RAY_DATA``, else ``../shared/data`` beside this
    checkout, else ``~/.cache/fedrag_ray/data``)."""
    from fedrag_ray.data import data_dir

    print(data_dir())


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
