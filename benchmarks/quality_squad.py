"""Does fine-tuning help, by how much, and how sure are we? Open-domain SQuAD v1.1 with
the real default models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2).

    python benchmarks/quality_squad.py [--only ROW ...] [--seeds 3] [--eval 1000]

Task: retrieval over every paragraph of the SQuAD v1.1 training file (18,896 passages);
validation questions are a seeded sample of whole articles that no training step sees
(``data.eval_fraction`` 0.2 of the 442 articles, ``data.max_eval`` questions). EM / F1 use
the official normalisation and the best over the gold answers; the answer is the first
line the generator writes (16 new tokens at most), from the top retrieved paragraph.

Rows (run directories under ``runs/quality_squad/``; a row whose resolved config is
unchanged is reused, so an interrupted benchmark continues where it stopped):

- ``zero_shot``: the untouched models, with retrieval and closed-book;
- ``ralt_s<seed>``: RALT (generator LoRA r 16 on q/k/v/o, top-1 retrieved passage), one
  row per training seed; ``ralt_mlp_s<seed>``: the same with LoRA on the MLP too
  (gate/up/down), what QLoRA found a small adapter needs to match full fine-tuning;
  ``ralt_2k_s<seed>``: RALT for ``--epoch-steps`` (one pass over the config's 2,000
  training questions instead of 800), whether more labelled questions lift the reader;
  ``ralt_4k_s<seed>``: the same over 4,000 questions (500 steps; no closed-book);
  ``ralt_8k_s<seed>``: over 8,000 questions (1,000 steps; no closed-book);
- ``lsr_s0``: LSR on the query encoder's LoRA with the RALT-trained generator
  (``ralt_s0``) as the teacher, evaluated with that generator — RA-DIT's two stages, both
  components tuned; ``lsr_only_s0`` evaluates the same retriever with the base generator;
- ``fed_s<seed>``: 8 clients that each hold the questions of their own articles (≤ 100),
  private paragraphs per client plus the public rest, FedAvg, rounds x local steps;
  ``central_eq_s<seed>``: one site on the same questions for the same total steps;
  ``local_c<k>``: client k trains alone for the steps it does in the federation;
  ``fedm_s<seed>``: the same federation with FedAvgM (``--server-lr`` times the clients'
  mean delta): FedAvg moves the model by one client's local steps per round, so at equal
  total steps it trails one site that takes all of them in sequence;
  ``fedmom_r<rounds>_s<seed>``: FedAvgM with server momentum 0.9 (server lr 1) over 10 or 20
  rounds of the same total steps (2 or 1 local steps per round); ``fedmom_half_s<seed>``:
  the same with half the clients per round (4 of 8) over twice the rounds of one step
  (40): the same total steps, as many per client on average.

Every metric carries a 95% bootstrap interval over the questions; every comparison is the
paired difference on the same questions with its interval, and counts as a win only when
the interval excludes 0. Multi-seed rows average each question's score over the seeds
(the interval then covers question sampling) and report the spread over seeds beside it.
Throughput: training tokens/s, evaluated questions/s and the achieved FLOP/s as a share
of this machine's fp32 / bf16 matmul peak, measured in the same process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from harness import REPO, RESULTS, offline_env, write_result
from harness.scores import read_scores, write_scores

RUNS = REPO / "runs" / "quality_squad"  # --runs
STORE = REPO / "runs" / "stores" / "squad"  # --runs/../stores/squad with --runs
# every row's per-question scores, committed: comparisons outlive the run directories
SCORES = RESULTS / "quality_squad_scores"  # --out/quality_squad_scores with --out
TARGET_SEEDS = 3  # a target is judged on this many training seeds or more
TARGETS = {
    "ralt_vs_zero_shot": 0.25,
    "ralt_rag_vs_closed_book": 0.15,
    "lsr_recall@1": 0.05,
    "lsr_end_to_end": 0.0,
    "radit_vs_best_single": 0.0,
    "fed_vs_local_mean": 0.05,
    "fed_vs_central": -0.03,
}


@dataclass
class Row:
    """One run: ``kind`` is eval (no training), train (centralized), federated or local;
    ``overrides`` are dotted config fields on top of the bundled ``squad`` config."""

    name: str
    label: str
    kind: str
    overrides: dict[str, Any]
    needs: tuple[str, ...] = ()
    client: int | None = None
    config: str = "squad"  # the bundled config the overrides apply to


def base_overrides(args: argparse.Namespace) -> dict[str, Any]:
    extra = {"data.max_articles": args.max_articles} if args.max_articles else {}
    return {
        **extra,
        "data.max_eval": args.eval,
        "knowledge_store.path": str(STORE),
        "eval.closed_book": True,
        "train.max_steps": args.steps,
    }


def fed_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The federated task: ``squad_federated``'s shape (8 clients by article, 100
    questions each at most) with this benchmark's evaluation set and store."""
    return {
        **base_overrides(args),
        "data.max_train": 8 * args.client_questions,
        "federation.num_clients": 8,
        "federation.rounds": args.rounds,
        "federation.local_steps": args.local_steps,
        "federation.partition.type": "field",
        "federation.partition.field": "title",
        "federation.knowledge": "both",
        "federation.client_resources.num_cpus": 1,
        "federation.eval_every": args.rounds,
        # zero_shot and ralt_s* measure the initial model and closed-book already
        "eval.before": False,
        "eval.closed_book": False,
    }


def momentum_overrides(fed: dict[str, Any], rounds: int, local_steps: int) -> dict[str, Any]:
    """FedAvgM as its paper runs it (server lr 1, momentum 0.9) over ``rounds`` rounds of
    ``local_steps`` steps, evaluated once at the end."""
    return {
        **fed,
        "federation.rounds": rounds,
        "federation.local_steps": local_steps,
        "federation.eval_every": rounds,
        "federation.strategy.name": "fedavgm",
        "federation.strategy.server_lr": 1.0,
        "federation.strategy.server_momentum": 0.9,
    }


def all_rows(args: argparse.Namespace) -> list[Row]:
    """In priority order: the headline rows first."""
    base = base_overrides(args)
    seeds = range(args.seeds)
    rows = [Row("zero_shot", "zero-shot RAG", "eval", base)]
    rows += [
        Row(f"ralt_s{s}", "RALT", "train", {**base, "seed": s, "eval.before": False}) for s in seeds
    ]
    rows.append(
        Row(
            "lsr_s0",
            "RA-DIT: LSR (RALT teacher) + RALT",
            "train",
            {
                **base,
                "train.method": "lsr",
                "train.init_from": str(RUNS / "ralt_s0"),
                "eval.before": False,
                "eval.closed_book": False,  # the generator's closed-book is ralt_s0's
            },
            needs=("ralt_s0",),
        )
    )
    rows.append(
        Row(
            "lsr_only_s0",
            "LSR only",
            "eval",
            {**base, "eval.closed_book": False},  # closed-book is zero_shot's
            needs=("lsr_s0",),
        )
    )
    fed_steps = args.rounds * args.local_steps
    fed = fed_overrides(args)
    central = {k: v for k, v in fed.items() if not k.startswith("federation.")}
    for s in seeds:
        rows.append(
            Row(
                f"fed_s{s}",
                "federated (8 clients)",
                "federated",
                {**fed, "seed": s},
                config="squad_federated",
            )
        )
        rows.append(
            Row(
                f"central_eq_s{s}",
                "centralized, equal steps",
                "train",
                {**central, "seed": s, "train.max_steps": 8 * fed_steps, "eval.before": False},
                config="squad_federated",
            )
        )
    fedm = {
        **fed,
        "federation.strategy.name": "fedavgm",
        "federation.strategy.server_lr": args.server_lr,
        "federation.strategy.server_momentum": args.server_momentum,
    }
    for s in seeds:
        rows.append(
            Row(
                f"fedm_s{s}",
                f"federated, FedAvgM (server lr {args.server_lr:g})",
                "federated",
                {**fedm, "seed": s},
                config="squad_federated",
            )
        )
    mlp = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    rows += [
        Row(
            f"ralt_mlp_s{s}",
            "RALT, LoRA on attention + MLP",
            "train",
            {**base, "seed": s, "eval.before": False, "generator.lora.target_modules": mlp},
        )
        for s in seeds
    ]
    rows += [
        Row(
            f"ralt_2k_s{s}",
            f"RALT, {8 * args.epoch_steps:,} questions ({args.epoch_steps} steps)",
            "train",
            {**base, "seed": s, "eval.before": False, "train.max_steps": args.epoch_steps},
        )
        for s in seeds
    ]
    # no closed-book (the RAG vs closed-book claim is ralt_s*'s): does the trend from 800
    # to 2,000 questions go on at 4,000?
    rows += [
        Row(
            f"ralt_4k_s{s}",
            "RALT, 4,000 questions (500 steps)",
            "train",
            {
                **base,
                "seed": s,
                "eval.before": False,
                "eval.closed_book": False,
                "data.max_train": 4000,
                "train.max_steps": 500,
            },
        )
        for s in seeds
    ]
    # the next doubling (1,000 steps): 800 -> 2,000 -> 4,000 added 1.5-2 EM points each
    rows += [
        Row(
            f"ralt_8k_s{s}",
            "RALT, 8,000 questions (1,000 steps)",
            "train",
            {
                **base,
                "seed": s,
                "eval.before": False,
                "eval.closed_book": False,
                "data.max_train": 8000,
                "train.max_steps": 1000,
            },
        )
        for s in seeds
    ]
    # FedAvgM as its paper runs it (server lr 1, momentum 0.9) over more, shorter rounds at
    # the same total steps: momentum carries the clients' common direction from round to
    # round instead of scaling one round's noisy delta, which is what server lr 4 did
    for rounds in (10, 20):
        assert fed_steps % rounds == 0, f"{fed_steps} steps do not split into {rounds} rounds"
        per_round = fed_steps // rounds
        rows += [
            Row(
                f"fedmom_r{rounds}_s{s}",
                f"FedAvgM, momentum 0.9, {rounds} rounds x {per_round} step"
                + "s" * (per_round > 1),
                "federated",
                {**momentum_overrides(fed, rounds, per_round), "seed": s},
                config="squad_federated",
            )
            for s in seeds
        ]
    # twice the rounds again, with half the clients in each (seeded by the round): the
    # same 160 steps in all and 20 per client on average, 40 server steps for momentum
    # to add up instead of 20 (fedmom_r20 closed two fifths of the gap to centralized)
    rounds = 2 * fed_steps
    rows += [
        Row(
            f"fedmom_half_s{s}",
            f"FedAvgM, momentum 0.9, {rounds} rounds x 1 step, 4 of 8 clients",
            "federated",
            {
                **momentum_overrides(fed, rounds, 1),
                "seed": s,
                "federation.clients_per_round": 4,
            },
            config="squad_federated",
        )
        for s in seeds
    ]
    for c in range(8):
        rows.append(
            Row(
                f"local_c{c}",
                "local-only",
                "local",
                {**fed, "train.max_steps": fed_steps, "eval.before": False},
                client=c,
                config="squad_federated",
            )
        )
    return rows


# --------------------------------------------------------------------------- running


def _config(row: Row) -> Any:
    from fedrag_ray.config import load_config

    cfg = load_config(row.config, row.overrides)
    if row.kind in ("train", "local", "eval"):
        cfg = cfg.model_copy(update={"federation": None})
    return cfg


def _fingerprint(row: Row, cfg: Any) -> str:
    """The row's resolved config, hashed. The store's path is where this checkout keeps
    it, not what it holds (the corpus and retriever are in the config), so it is left out:
    a stored row's scores are read back on any machine whose config resolves the same."""
    doc = json.dumps({"kind": row.kind, "client": row.client, "cfg": cfg.model_dump(mode="json")})
    doc = doc.replace(json.dumps(str(STORE))[1:-1], "<store>")
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def _reusable(run_dir: Path, fingerprint: str) -> bool:
    meta = run_dir / "row.json"
    return (
        (run_dir / "results.json").exists()
        and meta.exists()
        and json.loads(meta.read_text()).get("fingerprint") == fingerprint
    )


def _eval_only(row: Row, cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Evaluate without training: the base models, or (``lsr_only``) the LSR row's
    retriever with the base generator."""
    from fedrag_ray.centralized import load_init_state, prepare_store
    from fedrag_ray.data import eval_examples, load_dataset_from_config
    from fedrag_ray.evaluate import evaluate_detailed
    from fedrag_ray.rag import RAGSystem

    if row.needs:  # the retriever arrays of the row it depends on, nothing else
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"method": "lsr"})})
    data = load_dataset_from_config(cfg.data)
    system = RAGSystem(cfg)
    if row.needs:
        state = np.load(RUNS / row.needs[0] / "trainable_state.npz")
        retriever_only = {k: v for k, v in state.items() if k.startswith("retriever.")}
        tmp = run_dir / "retriever_state.npz"
        np.savez(tmp, **retriever_only)
        load_init_state(system, tmp)
    store = prepare_store(system, data)
    held = eval_examples(cfg, data)
    t = time.perf_counter()
    ev = evaluate_detailed(system, held, store)
    return {
        "metrics_after": ev.metrics,
        "per_question_after": ev.per_question,
        "predictions_after": ev.predictions,
        "eval_ids": [e.id for e in held],
        "timings": {"eval_after_s": time.perf_counter() - t},
        "token_counts": dict(system.generator.token_counts),
        "config": cfg.model_dump(mode="json"),
    }


def _train(row: Row, cfg: Any, run_dir: Path) -> dict[str, Any]:
    from fedrag_ray.centralized import run_centralized

    subset = None
    if row.kind == "local":
        from fedrag_ray.data import load_dataset_from_config
        from fedrag_ray.federated.sampling import client_partitions

        fed_cfg = _fed_config_of(row)
        train = load_dataset_from_config(fed_cfg.data).train
        subset = client_partitions(fed_cfg, train)[row.client]
    res = run_centralized(cfg, run_dir, train_subset=subset)
    system = res.pop("system")
    res["token_counts"] = dict(system.generator.token_counts)
    res["train_questions"] = len(subset) if subset is not None else res["num_train"]
    return res


def _fed_config_of(row: Row) -> Any:
    from fedrag_ray.config import load_config

    return load_config(row.config, row.overrides)


def _federated(row: Row, cfg: Any, run_dir: Path) -> dict[str, Any]:
    from fedrag_ray.federated import run_federated
    from fedrag_ray.preflight import resumable

    resume = resumable(cfg, run_dir)  # a killed row goes on from its last round
    if resume:
        print(f"[{row.name}] resuming from {run_dir / 'checkpoint'}", flush=True)
    res = run_federated(cfg, run_dir, num_cpus=1, resume=resume)
    res.pop("final_arrays", None)
    res["eval_ids"] = _eval_ids(cfg)
    return res


def _eval_ids(cfg: Any) -> list[str]:
    """The held-out questions' ids in the order evaluation scores them: a federated run's
    results do not list them (its server evaluates the same ``eval_examples``)."""
    from fedrag_ray.data import eval_examples, load_dataset_from_config

    return [e.id for e in eval_examples(cfg, load_dataset_from_config(cfg.data))]


RUNNERS: dict[str, Callable[[Row, Any, Path], dict[str, Any]]] = {
    "eval": _eval_only,
    "train": _train,
    "local": _train,
    "federated": _federated,
}


def row_fingerprint(row: Row) -> str:
    return _fingerprint(row, _config(row) if row.kind != "federated" else _fed_config_of(row))


def load_row(row: Row, fingerprint: str | None = None) -> dict[str, Any] | None:
    """A row's results without running it: its run directory, else its stored scores
    (``SCORES``), when either was made with the row's current config (``fingerprint``,
    computed when not given); ``command`` is the command that ran it."""
    run_dir, fingerprint = RUNS / row.name, fingerprint or row_fingerprint(row)
    if _reusable(run_dir, fingerprint):
        res = json.loads((run_dir / "results.json").read_text())
        res["command"] = json.loads((run_dir / "row.json").read_text()).get("command", "")
        if "eval_ids" not in res:  # a federated run from before _federated listed them
            res["eval_ids"] = _eval_ids(_fed_config_of(row))
        store_scores(row.name, fingerprint, res)  # a run from before SCORES existed
        return res
    return read_scores(SCORES, row.name, fingerprint)


def store_scores(name: str, fingerprint: str, res: dict[str, Any]) -> None:
    if read_scores(SCORES, name, fingerprint) is None:
        write_scores(
            SCORES, name, fingerprint, res["command"], res["eval_ids"], per_question(res), res
        )


def run_row(row: Row) -> dict[str, Any]:
    """The row's results (from its run directory or stored scores when its config is
    unchanged)."""
    from fedrag_ray.atomic import atomic_write_json

    cfg = _config(row) if row.kind != "federated" else _fed_config_of(row)
    run_dir = RUNS / row.name
    fingerprint = _fingerprint(row, cfg)
    known = load_row(row, fingerprint)
    if known is not None:
        print(f"[{row.name}] reusing its results (config unchanged)", flush=True)
        return known
    for dep in row.needs:
        if not (RUNS / dep / "results.json").exists():
            raise RuntimeError(f"row {row.name} needs row {dep}: run it first")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{row.name}] running ({row.kind})", flush=True)
    t = time.perf_counter()
    res = RUNNERS[row.kind](row, cfg, run_dir)
    res["wall_s"] = time.perf_counter() - t
    atomic_write_json(run_dir / "results.json", _jsonable(res))
    atomic_write_json(
        run_dir / "row.json",
        {"fingerprint": fingerprint, "name": row.name, "command": _command()},
    )
    print(f"[{row.name}] done in {res['wall_s']:.0f}s: {_brief(res)}", flush=True)
    res = json.loads((run_dir / "results.json").read_text())
    res["command"] = _command()
    store_scores(row.name, fingerprint, res)
    return res


def _command() -> str:
    import sys

    return " ".join(["python", *sys.argv])


def row_commands(done: dict[str, dict[str, Any]]) -> list[str]:
    """The commands that ran the published rows (a ``--summary-only`` publish names
    them, not itself)."""
    out: list[str] = []
    for res in done.values():
        cmd = res.get("command")
        if cmd and cmd not in out:
            out.append(cmd)
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: getattr(o, "tolist", lambda: str(o))()))


def _brief(res: dict[str, Any]) -> str:
    m = res.get("metrics_after", {})
    return ", ".join(f"{k} {m[k]:.3f}" for k in ("exact_match", "f1", "recall@1") if k in m)


# --------------------------------------------------------------------------- statistics


def per_question(res: dict[str, Any]) -> dict[str, list[float]]:
    """A row's per-question scores after training (federated: the last evaluation)."""
    if "per_question_after" in res:
        return res["per_question_after"]
    return res["history"][-1].get("per_question", {})


def seed_average(results: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Each question's score averaged over the rows (seeds or clients)."""
    keys = set.intersection(*(set(per_question(r)) for r in results))
    return {k: np.mean([per_question(r)[k] for r in results], axis=0) for k in sorted(keys)}


def summarise(name: str, label: str, results: list[dict[str, Any]], cfg_eval: Any) -> dict:
    from fedrag_ray.stats import bootstrap_ci

    avg = seed_average(results)
    metrics = {}
    for k, v in avg.items():
        ci = bootstrap_ci(v, cfg_eval["samples"], cfg_eval["confidence"], cfg_eval["seed"])
        per_seed = [float(np.nanmean(per_question(r)[k])) for r in results]
        metrics[k] = {
            "mean": ci.mean,
            "lo": ci.lo,
            "hi": ci.hi,
            "seed_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None,
            "per_seed": per_seed,
        }
    out = {"label": label, "seeds": len(results), "rows": name, "metrics": metrics}
    split = em_by_retrieval(avg, cfg_eval)
    return {**out, "exact_match_by_retrieval": split} if split else out


def em_by_retrieval(avg: dict[str, np.ndarray], cfg_eval: Any) -> dict[str, Any] | None:
    """EM on the questions whose gold paragraph was retrieved first and on the rest: with
    one passage in the prompt, EM is about recall@1 x the first group's EM, so this says
    how much of what is missing is the reader's and how much the retriever's."""
    from fedrag_ray.stats import bootstrap_ci

    if "recall@1" not in avg or "exact_match" not in avg:
        return None
    first = avg["recall@1"] >= 0.5  # seed-averaged: the retriever is the same in most rows
    out = {}
    for key, mask in (("gold_first", first), ("gold_not_first", ~first)):
        if mask.any():
            ci = bootstrap_ci(
                avg["exact_match"][mask],
                cfg_eval["samples"],
                cfg_eval["confidence"],
                cfg_eval["seed"],
            )
            out[key] = {"questions": int(mask.sum()), "mean": ci.mean, "lo": ci.lo, "hi": ci.hi}
    return out


def compare(
    name: str,
    label: str,
    metric: str,
    after: dict[str, np.ndarray],
    before: dict[str, np.ndarray],
    cfg_eval: dict[str, Any],
    seeds: int,
    target: float | None,
    after_metric: str | None = None,
) -> dict[str, Any]:
    from fedrag_ray.stats import paired_difference

    d = paired_difference(
        after[after_metric or metric],
        before[metric],
        cfg_eval["samples"],
        cfg_eval["confidence"],
        cfg_eval["seed"],
    )
    return {
        "name": name,
        "label": label,
        "metric": metric if after_metric is None else f"{after_metric} - {metric}",
        "diff": d.mean,
        "lo": d.lo,
        "hi": d.hi,
        "win": d.excludes_zero and d.mean > 0,
        "target": None if target is None else f">= {target:+.2f}",
        # a target is met when the whole interval clears it (a point estimate that
        # clears it inside a wide interval is not a measured win)
        "met": None if target is None else bool(d.lo >= target),
        "seeds": seeds,
        "questions": d.n,
    }


def comparisons(done: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict]:
    ev = {"samples": 2000, "confidence": 0.95, "seed": 0}
    out: list[dict] = []

    def rows(prefix: str) -> list[dict[str, Any]]:
        return [done[n] for n in sorted(done) if n.startswith(prefix)]

    zero = done.get("zero_shot")
    ralt = rows("ralt_s")
    if zero and ralt:
        z, r = seed_average([zero]), seed_average(ralt)
        n = len(ralt)
        out.append(
            compare(
                "ralt_vs_zero_shot",
                "RALT vs zero-shot RAG",
                "exact_match",
                r,
                z,
                ev,
                n,
                TARGETS["ralt_vs_zero_shot"],
            )
        )
        out.append(
            compare("ralt_f1_vs_zero_shot", "RALT vs zero-shot RAG (F1)", "f1", r, z, ev, n, None)
        )
        out.append(
            compare(
                "ralt_rag_vs_closed_book",
                "trained RAG vs trained closed-book",
                "closed_book_exact_match",
                r,
                r,
                ev,
                n,
                TARGETS["ralt_rag_vs_closed_book"],
                after_metric="exact_match",
            )
        )
    defined = {r.name.rsplit("_s", 1)[0]: r for r in all_rows(args)}  # one per family
    for prefix in ("ralt_mlp", "ralt_2k", "ralt_4k", "ralt_8k"):
        label = defined[prefix].label
        variant = rows(f"{prefix}_s")
        if zero and variant:
            enough = len(variant) >= TARGET_SEEDS
            target = TARGETS["ralt_vs_zero_shot"] if enough else None
            label = label if enough else f"{label}, {len(variant)} seed"
            out.append(
                compare(
                    f"{prefix}_vs_zero_shot",
                    f"{label} vs zero-shot RAG",
                    "exact_match",
                    seed_average(variant),
                    seed_average([zero]),
                    ev,
                    len(variant),
                    target,
                )
            )
    # more labelled questions, step by step (each row one pass over them, batches of 8)
    ralt_2k, ralt_4k, ralt_8k = rows("ralt_2k_s"), rows("ralt_4k_s"), rows("ralt_8k_s")
    questions = {
        k: f"{8 * defined[k].overrides['train.max_steps']:,}"
        for k in ("ralt", "ralt_2k", "ralt_4k", "ralt_8k")
    }
    for more, fewer, a, b in (
        ("ralt_2k", "ralt", ralt_2k, ralt),
        ("ralt_4k", "ralt_2k", ralt_4k, ralt_2k),
        ("ralt_8k", "ralt_4k", ralt_8k, ralt_4k),
    ):
        if a and b:
            out.append(
                compare(
                    f"{more}_vs_{fewer}",
                    f"RALT on {questions[more]} vs {questions[fewer]} questions",
                    "exact_match",
                    seed_average(a),
                    seed_average(b),
                    ev,
                    min(len(a), len(b)),
                    None,
                )
            )
    lsr, lsr_only = done.get("lsr_s0"), done.get("lsr_only_s0")
    if zero and lsr:
        z, lq = seed_average([zero]), seed_average([lsr])
        out.append(
            compare(
                "lsr_recall@1",
                "LSR (RALT teacher): recall@1 over the corpus",
                "recall@1",
                lq,
                z,
                ev,
                1,
                TARGETS["lsr_recall@1"],
            )
        )
    if ralt and lsr:
        r1 = seed_average([done["ralt_s0"]]) if "ralt_s0" in done else seed_average(ralt)
        lq = seed_average([lsr])
        out.append(
            compare(
                "lsr_end_to_end",
                "RA-DIT (LSR + RALT) vs RALT: EM",
                "exact_match",
                lq,
                r1,
                ev,
                1,
                TARGETS["lsr_end_to_end"],
            )
        )
        if lsr_only:
            lo_ = seed_average([lsr_only])
            best = r1 if np.nanmean(r1["exact_match"]) >= np.nanmean(lo_["exact_match"]) else lo_
            out.append(
                compare(
                    "radit_vs_best_single",
                    "RA-DIT vs the better of RALT / LSR-only",
                    "exact_match",
                    lq,
                    best,
                    ev,
                    1,
                    TARGETS["radit_vs_best_single"],
                )
            )
    central, local = rows("central_eq_s"), rows("local_c")
    short = {"fed": "federated", "fedm": "FedAvgM"}
    for name in ("fed", "fedm", "fedmom_r10", "fedmom_r20", "fedmom_half"):
        label = short.get(name) or defined[name].label
        out += _federated_comparisons(name, label, rows(f"{name}_s"), central, local, ev)
    return out


def _federated_comparisons(
    name: str,
    label: str,
    fed: list[dict[str, Any]],
    central: list[dict[str, Any]],
    local: list[dict[str, Any]],
    ev: dict[str, Any],
) -> list[dict]:
    """``<name>_vs_local_mean`` / ``_vs_local_worst`` / ``_vs_central`` for one federation
    (the targets are the issue's, whichever strategy the federation uses, and are judged
    on ``TARGET_SEEDS`` training seeds: fewer are shown beside them, with their count)."""
    out: list[dict] = []
    enough = len(fed) >= TARGET_SEEDS
    label = label if enough else f"{label}, {len(fed)} seed"
    target = {k: v if enough else None for k, v in TARGETS.items()}
    if fed and local:
        f, l_ = seed_average(fed), seed_average(local)
        out.append(
            compare(
                f"{name}_vs_local_mean",
                f"{label} vs local-only (mean of {len(local)} of 8 clients)",
                "exact_match",
                f,
                l_,
                ev,
                len(fed),
                target["fed_vs_local_mean"],
            )
        )
        worst = min(local, key=lambda r: np.nanmean(per_question(r)["exact_match"]))
        out.append(
            compare(
                f"{name}_vs_local_worst",
                f"{label} vs the worst local-only client (of {len(local)})",
                "exact_match",
                f,
                seed_average([worst]),
                ev,
                len(fed),
                None,
            )
        )
    if fed and central:
        out.append(
            compare(
                f"{name}_vs_central",
                f"{label} vs centralized (equal total steps)",
                "exact_match",
                seed_average(fed),
                seed_average(central),
                ev,
                min(len(fed), len(central)),
                target["fed_vs_central"],
            )
        )
    return out


# --------------------------------------------------------------------------- throughput


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
    """Best-of FLOP/s of an n x n matmul with this process's torch threads."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def row_threads(command: str) -> int | None:
    """The ``--threads`` a row ran with, from the command that ran it."""
    words = command.split()
    return int(words[words.index("--threads") + 1]) if "--threads" in words else None


def throughput(done: dict[str, dict[str, Any]], params: float) -> dict[str, Any]:
    """Training tokens/s and evaluated questions/s per centralized row. Achieved FLOP/s:
    4 N per trained token (forward 2N, backward through the frozen base 2N: LoRA needs no
    weight gradients of the base), 2 N per scored or decoded token; N excludes the tied
    embedding, whose output projection only runs on the answer positions."""
    out = {}
    for name, res in done.items():
        tok = res.get("token_counts") or {}
        t = res.get("timings") or {}
        row: dict[str, Any] = {}
        if tok.get("train") and t.get("train_s"):
            flops = 4 * params * tok["train"] + 2 * params * tok.get("score", 0)
            row["train_tokens_per_s"] = tok["train"] / t["train_s"]
            row["train_flops_per_s"] = flops / t["train_s"]
        eval_s = t.get("eval_after_s")
        n = len(res.get("eval_ids") or [])
        if eval_s and n:
            row["eval_questions_per_s"] = n / eval_s
            gen = tok.get("prompt", 0) + tok.get("generated", 0)
            if gen:
                row["eval_flops_per_s"] = 2 * params * gen / eval_s
        if row:
            out[name] = row
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="row names (default: all, in priority order)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--eval", type=int, default=1000, help="validation questions")
    ap.add_argument("--steps", type=int, default=100, help="centralized RALT / LSR steps")
    ap.add_argument(
        "--epoch-steps",
        type=int,
        default=250,
        help="ralt_2k_s* rows' steps: one pass over squad's 2,000 questions, batches of 8",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--client-questions", type=int, default=100)
    ap.add_argument("--server-lr", type=float, default=2.0, help="fedm_s* rows' FedAvgM step")
    ap.add_argument("--server-momentum", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--summary-only", action="store_true", help="summarise the runs done")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="publish only rows with runs or stored scores (default: keep the published "
        "rows and comparisons that cannot be recomputed, marked as carried)",
    )
    ap.add_argument("--max-articles", type=int, default=None, help="smoke runs: fewer articles")
    ap.add_argument("--runs", type=Path, default=None, help="run directories (smoke runs)")
    ap.add_argument("--out", type=Path, default=None, help="result folder (smoke runs)")
    args = ap.parse_args()
    offline_env()
    global RUNS, STORE, SCORES
    if args.runs:
        RUNS, STORE = args.runs, args.runs / "stores" / "squad"
    if args.out:
        SCORES = args.out / "quality_squad_scores"
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = all_rows(args)
    names = {r.name for r in rows}
    unknown = set(args.only or []) - names
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; known: {sorted(names)}")
    peak = {"fp32": matmul_peak("fp32"), "bf16": matmul_peak("bf16")}
    print(f"matmul peak: fp32 {peak['fp32'] / 1e9:.0f}, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    # the publish before this process writes any: what it carries comes from there, not
    # from this process's own earlier writes
    result = (args.out or RESULTS) / "quality_squad.json"
    previous = json.loads(result.read_text()) if result.exists() and not args.fresh else None
    wanted = [
        r for r in rows if (args.only is None or r.name in args.only) and not args.summary_only
    ]
    done: dict[str, dict[str, Any]] = {}
    for row in rows:  # what is known already, then each wanted row, published as it ends
        known = load_row(row) if row not in wanted else None
        if known is not None:
            done[row.name] = known
    for row in wanted:
        done[row.name] = run_row(row)
        publish(done, rows, args, peak, previous)
    if not wanted and done:
        publish(done, rows, args, peak, previous)


def publish(
    done: dict[str, dict[str, Any]],
    rows: list[Row],
    args: argparse.Namespace,
    peak: dict[str, float],
    previous: dict[str, Any] | None,
) -> None:
    ev = {"samples": 2000, "confidence": 0.95, "seed": 0}
    done = {r.name: done[r.name] for r in rows if r.name in done}  # in the rows' order
    groups: dict[str, list[str]] = {}
    labels = {}
    for r in rows:
        if r.name in done:
            key = r.name.rsplit("_s", 1)[0] if r.name.rsplit("_s", 1)[-1].isdigit() else r.name
            key = "local" if r.kind == "local" else key
            groups.setdefault(key, []).append(r.name)
            labels[key] = r.label
    summary_rows = {
        key: {**summarise(key, labels[key], [done[n] for n in names], ev), "rows": names}
        for key, names in groups.items()
    }
    n_params = 134_515_008 - 49_152 * 576  # SmolLM2-135M without its tied embedding
    thr = throughput(done, n_params)
    import torch

    for name, row in thr.items():
        # the peak is measured with this process's threads: a share of it only means
        # something for a row that ran with as many (ralt_4k_s0 ran on both cores)
        row["threads"] = row_threads(done[name].get("command", ""))
        if row["threads"] != torch.get_num_threads():
            continue
        for k in ("train_flops_per_s", "eval_flops_per_s"):
            if k in row:
                row[k.replace("flops_per_s", "share_of_bf16_peak")] = row[k] / peak["bf16"]
                row[k.replace("flops_per_s", "share_of_fp32_peak")] = row[k] / peak["fp32"]

    commands = row_commands(done)
    comps = comparisons(done, args)
    carried = carry_published(previous, summary_rows, comps, thr)
    comps.sort(key=comparison_rank)
    path = write_result(
        "quality_squad",
        {
            "eval_questions": args.eval,
            "task": {
                "data": "SQuAD v1.1 train, split by article (20% of articles held out)",
                "corpus_passages": 18896,
                "steps": args.steps,
                "federation": {
                    "clients": 8,
                    "rounds": args.rounds,
                    "local_steps": args.local_steps,
                    "questions_per_client_max": args.client_questions,
                },
            },
            "torch_threads": torch.get_num_threads(),
            "matmul_peak_flops": peak,
            "rows": summary_rows,
            "comparisons": comps,
            "throughput": thr,
            "missing_rows": [
                r.name for r in rows if r.name not in done and r.name not in carried["rows"]
            ],
            **({"carried": carried} if carried["rows"] or carried["comparisons"] else {}),
            **({"command": " ; ".join(commands)} if commands else {}),
        },
        **({"out_dir": args.out} if args.out else {}),
    )
    plot(summary_rows, comps, path.with_suffix(".png"))
    print(f"wrote {path} and its figure", flush=True)


# the comparisons' order, by the family their name starts with (the longest that fits)
COMPARISON_ORDER = (
    *("ralt", "ralt_f1", "ralt_rag", "ralt_mlp", "ralt_2k", "ralt_4k", "ralt_8k"),
    *("lsr", "radit", "fed", "fedm", "fedmom_r10", "fedmom_r20", "fedmom_half"),
)


def comparison_rank(comparison: dict[str, Any]) -> int:
    fits = [f for f in COMPARISON_ORDER if comparison["name"].startswith(f"{f}_")]
    return COMPARISON_ORDER.index(max(fits, key=len)) if fits else len(COMPARISON_ORDER)


def carry_published(
    previous: dict[str, Any] | None,
    summary_rows: dict[str, dict],
    comps: list[dict],
    thr: dict[str, dict],
) -> dict[str, Any]:
    """Keep what an earlier publish showed and this one cannot recompute: rows whose runs
    and scores are gone (published before their per-question scores were kept), and the
    comparisons built on them. ``summary_rows``, ``comps`` and ``thr`` gain them in place
    (to be put in ``COMPARISON_ORDER``); the returned record says what was carried
    and from which publish, so nothing is passed off as re-measured."""
    record: dict[str, Any] = {"rows": [], "comparisons": [], "from": []}
    if not previous:
        return record
    stamp = {k: previous.get(k) for k in ("commit", "date", "machine")}
    earlier = previous.get("carried") or {}
    for key, row in (previous.get("rows") or {}).items():
        if key not in summary_rows:
            summary_rows[key] = row
            record["rows"] += row.get("rows") or []
    for name in record["rows"]:
        if name in (previous.get("throughput") or {}) and name not in thr:
            thr[name] = previous["throughput"][name]
    fresh = {c["name"] for c in comps}
    for c in sorted(previous.get("comparisons") or [], key=comparison_rank):
        if c["name"] not in fresh:
            comps.append(c)
            record["comparisons"].append(c["name"])
    # the publishes they were measured for: an older carry keeps its own origin, and the
    # previous publish joins it when something it measured itself is carried now
    record["from"] = list(earlier.get("from") or [])
    own = set(record["rows"]) - set(earlier.get("rows") or [])
    own |= set(record["comparisons"]) - set(earlier.get("comparisons") or [])
    if own:
        record["from"].append({**stamp, "command": previous.get("command", "")})
    return record


# the left panel's order: baseline, the federated story, then the centralized variants
PLOT_ORDER = (
    *("zero_shot", "local", "fed", "fedm", "fedmom_r10", "fedmom_r20", "fedmom_half"),
    "central_eq",
    *("ralt", "ralt_mlp", "ralt_2k", "ralt_4k", "ralt_8k", "lsr", "lsr_only"),
)
FEDERATED_STORY = {
    *("local", "fed", "fedm", "fedmom_r10", "fedmom_r20", "fedmom_half", "central_eq"),
}


def plot(summary: dict[str, dict], comps: list[dict[str, Any]], path: Path) -> None:
    """Left: each run's EM with its 95% interval (seed-averaged; local-only averaged over
    the clients). Right: each paired comparison with its interval and its target, so a
    reader sees at once which intervals clear their target and which do not."""
    from harness.plots import figure, save

    keys = [k for k in PLOT_ORDER if k in summary] + [k for k in summary if k not in PLOT_ORDER]
    fig, (left, right) = figure(2, size=(17, 0.5 * max(len(keys), len(comps)) + 1.5))
    for i, key in enumerate(keys):
        em = summary[key]["metrics"]["exact_match"]
        colour = "tab:orange" if key in FEDERATED_STORY else "tab:blue"
        err = [[em["mean"] - em["lo"]], [em["hi"] - em["mean"]]]
        left.barh(i, em["mean"], xerr=err, color=colour, capsize=3)
        left.text(em["hi"] + 0.005, i, f"{em['mean']:.3f}", va="center", fontsize=7)
    left.set_yticks(
        range(len(keys)), [f"{summary[k]['label']} ({summary[k]['seeds']})" for k in keys]
    )
    left.invert_yaxis()
    left.set_xlim(0, max(summary[k]["metrics"]["exact_match"]["hi"] for k in keys) + 0.06)
    left.set_xlabel("exact match, validation articles (95% interval; runs averaged)")
    left.tick_params(axis="y", labelsize=7)
    left.grid(alpha=0.3, axis="x")
    left.set_title("EM per row; (n) = seeds, or clients for local-only", fontsize=9)
    for i, c in enumerate(comps):
        colour = "tab:green" if c.get("met") else ("tab:red" if c.get("target") else "grey")
        right.errorbar(
            c["diff"],
            i,
            xerr=[[c["diff"] - c["lo"]], [c["hi"] - c["diff"]]],
            fmt="o",
            color=colour,
            capsize=3,
        )
        if c.get("target"):
            t = float(c["target"].split()[-1])
            right.plot([t, t], [i - 0.35, i + 0.35], color="black", lw=2)
    right.axvline(0, color="grey", lw=0.8)
    right.set_yticks(range(len(comps)), [c["label"] for c in comps])
    right.invert_yaxis()
    right.tick_params(axis="y", labelsize=7)
    right.set_xlabel("paired difference (95% interval); black tick: target")
    right.grid(alpha=0.3, axis="x")
    right.set_title("paired comparisons: green = target met, red = missed", fontsize=9)
    save(fig, path)


if __name__ == "__main__":
    main()
