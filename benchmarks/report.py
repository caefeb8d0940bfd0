"""``docs/benchmarks.md`` and the README's results table, generated from the result JSONs.

    python -m benchmarks.report            # rewrite docs/benchmarks.md and the README table
    python -m benchmarks.report --check    # exit 1 if either differs from the JSONs

Every ``benchmarks/results/*.json`` gets one section: a renderer per known benchmark (the
shape of each file differs) and a generic one for any other file, each table headed by the
command, date and host its JSON records. No figure is typed by hand, so none can drift;
``tests/test_generated_docs.py`` runs ``--check``'s comparison.

The README's headline table (between ``<!-- results:start -->`` and ``<!-- results:end -->``)
comes from ``quality_squad.json`` (its ``comparisons``), or, until that file holds a
comparison, from ``quality_pubmedqa.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
MAX_HEADLINE_ROWS = 20  # room for every comparison with a target (17 now) and a few without

Doc = dict[str, Any]


# ---------------------------------------------------------------- formatting helpers


def num(x: Any, nd: int = 2) -> str:
    """A number for a table cell; ``-`` for a missing one."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != 0 and abs(x) < 0.5 * 10**-nd:  # a learning rate, not a rounded-away 0
            return f"{x:.{max(1, nd - 1)}g}"
        return f"{x:,.{nd}f}"
    return str(x)


def mark(met: Any) -> str:
    return "✔" if met is True else ("✘" if met is False else "-")


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"


def date_of(doc: Doc) -> str:
    raw = str(doc.get("date") or doc.get("date_utc") or "")
    if "T" in raw:
        day, clock = raw.split("T", 1)
        return f"{day} {clock[:5]} UTC"
    return raw or "not recorded"


def host_of(doc: Doc) -> str:
    """CPU model and core count (and GPU) as the JSON's ``machine`` records them."""
    m = doc.get("machine") or {}
    cpu = m.get("cpu_model") or "CPU model not recorded"
    cores = m.get("cpus") or m.get("cpu_count") or m.get("logical_cpus")
    bf16 = m.get("cpu_bf16")
    parts = [cpu + (f", {cores} cores" if cores else "")]
    threads = doc.get("torch_threads")
    if threads and cores and threads < cores:  # e.g. a run pinned to one core
        parts.append(f"run on {threads} torch thread{'s' if threads > 1 else ''}")
    if bf16:
        parts.append("/".join(bf16))
    gpu = m.get("cuda") or m.get("gpu")
    if gpu:
        parts.append(str(gpu))
    return ", ".join(parts)


def _short(commit: str) -> str:
    head, dirty = commit.split("+", 1) if "+" in commit else (commit, "")
    return head[:7] + (f"+{dirty}" if dirty else "")


def provenance(doc: Doc) -> str:
    commit = doc.get("commit") or (doc.get("git") or {}).get("commit")
    lines = [
        f"- command: `{doc.get('command', 'not recorded')}`",
        f"- date: {date_of(doc)}; host: {host_of(doc)}"
        + (f"; commit `{_short(str(commit))}`" if commit else ""),
    ]
    return "\n".join(lines) + "\n"


def _ci(m: dict[str, Any] | None, nd: int = 3) -> str:
    if not m or m.get("mean") is None:
        return "-"
    out = num(m["mean"], nd)
    if m.get("lo") is not None and m.get("hi") is not None:
        out += f" [{num(m['lo'], nd)}, {num(m['hi'], nd)}]"
    if m.get("seed_sd") is not None:
        sd = m["seed_sd"] if abs(m["seed_sd"]) > 1e-12 else 0.0  # equal seeds, float noise
        out += f" (seed sd {num(sd, nd)})"
    return out


def _signed_ci(c: dict[str, Any], nd: int = 3) -> str:
    def s(x: float) -> str:
        return f"{x:+.{nd}f}"

    out = s(c["diff"])
    if c.get("lo") is not None and c.get("hi") is not None:
        out += f" [{s(c['lo'])}, {s(c['hi'])}]"
    return out


# ---------------------------------------------------------------- one renderer per benchmark


def _seeds(value: Any) -> str:
    """``seeds`` is a count in quality_squad.py's rows, a list of seeds in older schemas."""
    if isinstance(value, list):
        return ", ".join(str(s) for s in value)
    return num(value)


def _sci(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, float) else num(x)


def _carried(doc: Doc, commits: bool = True) -> str:
    """Where the figures a publish carried (could not recompute) were published (date,
    host and, outside the README, commit), or '' when it carried none."""
    carried = doc.get("carried") or {}
    if not (carried.get("rows") or carried.get("comparisons")):
        return ""
    return "; ".join(
        f"{date_of(o)[:10]} on {host_of(o)}" + (f" (commit {o.get('commit')})" if commits else "")
        for o in carried.get("from", [])
    )


def render_quality_squad(doc: Doc) -> str:
    rows = doc.get("rows") or {}
    metrics: list[str] = []
    for r in rows.values():
        for k in r.get("metrics", {}):
            if k not in metrics:
                metrics.append(k)
    task = doc.get("task") or {}
    out = []
    if task:
        fed = task.get("federation") or {}
        out.append(
            f"{task.get('data', 'SQuAD v1.1')}; {num(task.get('corpus_passages'))} passages "
            f"retrieved over; {num(task.get('steps'))} training steps"
            + (
                f"; federated: {fed.get('clients')} clients × {fed.get('rounds')} rounds × "
                f"{fed.get('local_steps')} local steps"
                if fed
                else ""
            )
            + ".\n\n"
        )
    out.append(
        f"{num(doc.get('eval_questions'))} held-out questions; each cell the mean with its 95% "
        "bootstrap interval over questions (and the standard deviation over seeds where "
        "several ran).\n\n"
    )
    out.append(
        table(
            ["run", "seeds", *metrics],
            [
                [r.get("label", key), _seeds(r.get("seeds"))]
                + [_ci(r.get("metrics", {}).get(m)) for m in metrics]
                for key, r in rows.items()
            ],
        )
    )
    comps = doc.get("comparisons") or []
    if comps:
        out.append("\nPaired comparisons (difference on the same questions, 95% interval):\n\n")
        out.append(
            table(
                ["comparison", "metric", "difference [95% CI]", "better", "target", "met"],
                [
                    [
                        c.get("label", c.get("name")),
                        c.get("metric"),
                        _signed_ci(c),
                        mark(c.get("win")),
                        c.get("target") or "-",
                        mark(c.get("met")),
                    ]
                    for c in comps
                ],
            )
        )
    split = {
        k: r["exact_match_by_retrieval"]
        for k, r in rows.items()
        if r.get("exact_match_by_retrieval")
    }
    if split:
        out.append(
            "\nEM where the gold paragraph was retrieved first and where it was not (one "
            "passage reaches the generator, so EM is about recall@1 × the first column):\n\n"
        )
        out.append(
            table(
                ["run", "gold first: questions", "EM", "gold not first: questions", "EM"],
                [
                    [rows[k].get("label", k)]
                    + [
                        cell
                        for part in ("gold_first", "gold_not_first")
                        for cell in (num((s.get(part) or {}).get("questions")), _ci(s.get(part)))
                    ]
                    for k, s in split.items()
                ],
            )
        )
    thr = doc.get("throughput") or {}
    if thr:
        cols: list[str] = []
        for r in thr.values():
            cols += [k for k in r if k not in cols]
        out.append("\nThroughput (training tokens/s, evaluated questions/s, achieved FLOP/s):\n\n")
        out.append(
            table(["run", *cols], [[k, *(_sci(r.get(c)) for c in cols)] for k, r in thr.items()])
        )
    if doc.get("missing_rows"):
        out.append(f"\nNot run (yet): {', '.join(doc['missing_rows'])}.\n")
    origins = _carried(doc)
    if origins:
        carried = doc["carried"]
        out.append(
            "\nShown as an earlier publish gave them, not recomputed here (their runs predate "
            "the stored per-question scores): rows "
            f"{', '.join(carried.get('rows') or []) or 'none'}; comparisons "
            f"{', '.join(carried.get('comparisons') or []) or 'none'}. Published "
            f"{origins}.\n"
        )
    return "".join(out)


def render_quality_pubmedqa(doc: Doc) -> str:
    label_rows, long_rows = [], []
    for r in doc.get("runs", []):
        b, a = r.get("before") or {}, r.get("after") or {}
        peak = r.get("peak_rss_bytes_process_tree")
        common = [
            r.get("run"),
            r.get("method"),
            "yes" if r.get("federated") else "no",
            num(r.get("total_local_steps")),
            num(r.get("num_eval")),
            f"{num(b.get('recall@5'))} → {num(a.get('recall@5'))}" if b else num(a.get("recall@5")),
        ]
        tail = [num(peak / 2**30, 1) if peak else "-", num(r.get("seconds"), 0)]
        if "f1" in a or r.get("answer") == "long":
            long_rows.append(
                common
                + [
                    num(a.get("f1"), 3),
                    num(a.get("rouge_l"), 3),
                    num(a.get("closed_book_f1"), 3),
                    num(a.get("closed_book_rouge_l"), 3),
                ]
                + tail
            )
        else:
            label_rows.append(
                common
                + [
                    f"{num(b.get('accuracy'))} → {num(a.get('accuracy'))}"
                    if "accuracy" in b
                    else num(a.get("accuracy")),
                    num(a.get("closed_book_accuracy")),
                ]
                + tail
            )
    head = ["run", "method", "federated", "steps", "questions", "recall@5"]
    out = [
        f"Generator: {doc.get('generator', '-')}; {num(doc.get('steps_per_run'))} steps per "
        "trained run. Accuracy (yes/no/maybe) is the REPLUG ensemble over the top passages; "
        "closed-book: the same model with no passage.\n\n"
    ]
    if label_rows:
        out.append(table(head + ["accuracy", "closed-book accuracy", "peak GiB", "s"], label_rows))
    if long_rows:
        out.append("\nLong answers (generated, token F1 / ROUGE-L):\n\n")
        out.append(
            table(
                head + ["F1", "ROUGE-L", "closed-book F1", "closed-book ROUGE-L", "peak GiB", "s"],
                long_rows,
            )
        )
    targets = doc.get("targets") or {}
    if targets:
        out.append("\nTargets as the JSON records them:\n\n")
        out.append(
            table(
                ["target", "value"],
                [[k, num(v, 3)] for k, v in targets.items() if v is not None],
            )
        )
    return "".join(out)


def render_eval_speed(doc: Doc) -> str:
    runs = doc.get("runs", {})
    rows = [
        [
            name,
            num(r.get("seconds"), 1),
            num(r.get("questions_per_s"), 2),
            r.get("autocast"),
            r.get("frozen_linear_dtype"),
            num(r.get("accuracy"), 3),
        ]
        for name, r in runs.items()
    ]
    agree = doc.get("prediction_agreement") or {}
    return (
        f"{num(doc.get('questions'))} questions, top-{doc.get('top_k')} passages, "
        f"max_length {doc.get('max_length')}: `old` scores every (question, passage, option) "
        "as its own sequence; `new` runs one forward per (question, passage) and scores the "
        "options on its KV cache.\n\n"
        + table(["variant", "s", "questions/s", "autocast", "frozen Linear", "accuracy"], rows)
        + f"\nSpeed-up new vs old: **{num(doc.get('speedup_new_vs_old'))}×** "
        f"(fp32 only: {num(doc.get('speedup_new_fp32_vs_old'))}×); prediction agreement "
        + ", ".join(f"{k} {num(v)}" for k, v in agree.items())
        + f". Target: {doc.get('target', '-')}.\n"
    )


def render_simulation_scale(doc: Doc) -> str:
    rows = []
    for r in doc.get("runs", []):
        done = r.get("completed")
        rows.append(
            [
                num(r.get("registered")),
                num(r.get("per_round")),
                r.get("step"),
                r.get("backend"),
                num(r.get("setup_s"), 1) if done else (r.get("error") or "did not complete"),
                f"{num(r.get('round_s_steady'))} ({num(r.get('ideal_s_steady'))})" if done else "",
                num(r.get("engine_ms_per_task"), 1) if done else "",
                num(r.get("round2_cpu_ms_per_task"), 1) if done else "",
                f"{num((r.get('driver_peak_rss_bytes') or 0) / 2**30)} / "
                f"{num((r.get('peak_rss_bytes') or 0) / 2**30)}"
                if done
                else "",
            ]
        )
    out = [
        table(
            [
                "registered",
                "per round",
                "step",
                "backend",
                "setup s",
                "steady s/round (ideal)",
                "engine ms / task",
                "CPU ms / task",
                "peak GiB driver / total",
            ],
            rows,
        )
    ]
    targets = doc.get("targets") or {}
    if targets:
        out.append("\nTargets:\n\n")
        out.append(
            table(
                ["target", "worst", "limit", "met"],
                [
                    [
                        k,
                        num(next((v[x] for x in v if x.startswith("worst")), None)),
                        num(next((v[x] for x in v if x.startswith("limit")), None)),
                        mark(v.get("met")),
                    ]
                    for k, v in targets.items()
                ],
            )
        )
    return "".join(out)


def render_retrieval(doc: Doc) -> str:
    rows = []
    for r in doc.get("rows", []):
        params = ", ".join(f"{k} {v}" for k, v in (r.get("params") or {}).items())
        rows.append(
            [
                num(r.get("N")),
                r.get("index") + (f" ({params})" if params else ""),
                r.get("shards"),
                num(r.get("build_s"), 1),
                num(r.get("qps"), 0),
                num(r.get("recall_at_10"), 3),
                num(r.get("speedup_vs_numpy"), 1) + "×",
                num(r.get("peak_rss_mib"), 0),
            ]
        )
    return (
        f"{doc.get('data', '')}\n\n".replace("{", "").replace("}", "")
        if isinstance(doc.get("data"), str)
        else ""
    ) + table(
        [
            "N",
            "index",
            "shards",
            "build s",
            "qps",
            "recall@10",
            "vs NumPy brute force",
            "peak RSS MiB",
        ],
        rows,
    )


def _index_label(r: dict[str, Any]) -> str:
    if r.get("index") == "flat":
        return "flat"
    params = ", ".join(f"{k} {v}" for k, v in (r.get("params") or {}).items() if k != "nprobe")
    return f"{r.get('index')} ({params})"


def render_knowledge_scale(doc: Doc) -> str:
    rows = []
    for r in doc.get("rows", []):
        served = r.get("served_clients") or {}
        added = [b / 2**20 for b in served.get("added_bytes", [])]
        local = r.get("local_copy_client") or {}
        local_txt = (
            f"+{num(local['added_bytes'] / 2**20, 0)} MiB (1 actor measured)"
            if local.get("added_bytes")
            else f"not run: {local.get('why_not', '-')}"
        )
        for s in r.get("search", []):
            rows.append(
                [
                    num(r.get("n")),
                    _index_label(r),
                    num(s.get("nprobe")),
                    num(r.get("build_s"), 0),
                    f"+{num(min(added), 1)}–{num(max(added), 1)} MiB" if added else "-",
                    local_txt,
                    f"{num(s.get('local_qps'), 1)} / {num(s.get('served_qps'), 1)}",
                    num(s.get("served_recall@10"), 3),
                    num(s.get("served_equals_local_ids")),
                ]
            )
    summ = doc.get("summary") or {}
    return (
        table(
            [
                "passages",
                "index",
                "nprobe",
                "build s",
                "client actor, served",
                "client actor, local copy",
                "qps local / served",
                "recall@10",
                "served ids = local",
            ],
            rows,
        )
        + f"\nServed client growth from the smallest to the largest corpus: "
        f"{num(summ.get('served_client_growth_mib_first_to_last'))} MiB (target ≤ "
        f"{num(summ.get('target_growth_mib'))}); worst served / local qps "
        f"{num(summ.get('min_served_over_local_qps'))} (target ≥ "
        f"{num(summ.get('target_served_over_local_qps'))}); peak of the process tree "
        f"{num((summ.get('process_tree_peak_bytes') or 0) / 2**30)} GiB.\n"
    )


def render_peer_fedrag(doc: Doc) -> str:
    out = []
    if doc.get("note"):
        out.append(doc["note"] + "\n\n")
    job = doc.get("job") or {}
    out.append(
        f"Generator: {job.get('generator', '-')}; {num(job.get('n_train'))} questions, "
        f"{num(job.get('n_passages'))} passages, {job.get('rounds')} rounds × "
        f"{job.get('local_steps')} local steps, batch {job.get('batch_size')}, "
        f"repeats {job.get('repeats')}.\n\n"
    )
    out.append(doc.get("markdown_table", "").rstrip() + "\n")
    kept = doc.get("kept_from_earlier_run") or {}
    if kept:
        dates = sorted(
            {v["date"][:10] if isinstance(v, dict) else str(v)[:10] for v in kept.values()}
        )
        cells = [k for k in kept if k != "earlier_command"]
        out.append(f"\nCells kept from an earlier run ({', '.join(dates)}): {', '.join(cells)}.\n")
    verdicts = doc.get("verdicts") or {}
    if verdicts:
        rows = []
        for name, v in verdicts.items():
            for job_name, ratio in (v.get("ratios") or {}).items():
                target = doc.get("targets", {})
                limit = None
                for key, lim in target.items():
                    if key.split("_")[0] in name:
                        limit = lim
                rows.append(
                    [
                        name,
                        job_name,
                        num(ratio, 2) + "×" if ratio is not None else "not measured",
                        v.get("target"),
                        mark(ratio >= limit) if (ratio is not None and limit) else "-",
                    ]
                )
        out.append("\nTargets (peer / ours):\n\n")
        out.append(table(["target", "job", "ratio", "wanted", "met"], rows))
    for key, heading in (("notes", "How it is measured"), ("peer_defect_notes", "The peer")):
        if doc.get(key):
            out.append(f"\n<details><summary>{heading}</summary>\n\n")
            out.append("".join(f"- {' '.join(str(n).split())}\n" for n in doc[key]))
            out.append("\n</details>\n")
    return "".join(out)


def render_privacy_robustness(doc: Doc) -> str:
    s = doc.get("settings") or {}
    out = [
        f"Generator {s.get('generator')}, {s.get('clients')} clients, {s.get('rounds')} rounds "
        f"× {s.get('local_steps')} local steps, {num(s.get('train_questions'))} training / "
        f"{num(s.get('eval_questions'))} held-out questions.\n\n"
    ]
    dp = doc.get("dp") or {}
    if dp.get("rows"):
        out.append(
            f"Differential privacy (clipping norm {num(dp.get('clipping_norm'))}: "
            f"{dp.get('clipping_norm_from', '')}; accountant: {dp.get('accountant', '-')}):\n\n"
        )
        out.append(
            table(
                ["run", "noise multiplier", "ε", "noise std on mean", "accuracy", "recall@5"],
                [
                    [
                        r.get("run"),
                        num(r.get("noise_multiplier")),
                        num(r.get("epsilon"), 1) if r.get("epsilon") is not None else "∞",
                        num(r.get("noise_std_on_mean"), 3),
                        num(r.get("accuracy"), 3),
                        num(r.get("recall@5"), 3),
                    ]
                    for r in dp["rows"]
                ],
            )
        )
    robust = doc.get("robust") or {}
    if robust.get("rows"):
        out.append(f"\nRobust aggregation under attack (`{robust.get('faults')}`):\n\n")
        out.append(
            table(
                ["strategy", "accuracy", "recall@5", "distance to clean"],
                [
                    [
                        r.get("strategy"),
                        num(r.get("accuracy"), 3),
                        num(r.get("recall@5"), 3),
                        num(r.get("distance_to_clean"), 2),
                    ]
                    for r in robust["rows"]
                ],
            )
        )
    sa = doc.get("secagg") or {}
    if sa:
        out.append("\nSecAgg+ against plain FedAvg (steady rounds, median of repeats):\n\n")
        out.append(
            table(
                ["", "s / round", "CPU s / round", "bytes / round", "accuracy"],
                [
                    [
                        "FedAvg",
                        num(sa.get("plain_steady_s"), 1),
                        num(sa.get("plain_steady_cpu_s"), 1),
                        num(sa.get("plain_bytes_per_round")),
                        num((sa.get("metrics_plain") or {}).get("accuracy"), 3),
                    ],
                    [
                        "SecAgg+",
                        num(sa.get("secagg_steady_s"), 1),
                        num(sa.get("secagg_steady_cpu_s"), 1),
                        num(sa.get("secagg_bytes_per_round")),
                        num((sa.get("metrics_secagg") or {}).get("accuracy"), 3),
                    ],
                ],
            )
        )
    return "".join(out)


def render_lsr_context_lm(doc: Doc) -> str:
    before = doc.get("retrieval_before") or {}
    rows = [
        ["before (MiniLM)", 0, *(num(before.get(k), 3) for k in ("recall@1", "recall@5", "mrr"))]
    ]
    for name, r in (doc.get("runs") or {}).items():
        a = r.get("after") or {}
        rows.append(
            [name, r.get("steps"), *(num(a.get(k), 3) for k in ("recall@1", "recall@5", "mrr"))]
        )
    task = doc.get("task") or {}
    ctx = doc.get("context_lm_context") or {}
    return (
        f"{num(task.get('people'))} synthetic people × {task.get('passages_per_person')} "
        f"passages; {num(task.get('held_out_questions'))} held-out questions. The warmed-up "
        f"teacher puts the answer most likely under the gold passage for "
        f"{num(ctx.get('gold_is_most_likely'), 3)} of held-out questions.\n\n"
        + table(["run (held-out)", "steps", "recall@1", "recall@5", "MRR"], rows)
    )


def render_gpu_path(doc: Doc) -> str:
    res = doc.get("results") or {}
    rows = []
    for device in ("cpu", "gpu"):
        for r in res.get(device) or []:
            if "train_tokens_per_s" in r:
                what = (
                    f"train, generator {r.get('generator')}, quantization {r.get('quantization')}"
                )
                rows.append([device, what, f"{num(r['train_tokens_per_s'], 0)} tokens/s"])
            elif "qps" in r:
                rows.append(
                    [device, f"FAISS {r.get('index')} {num(r.get('n'))}", f"{num(r['qps'], 0)} qps"]
                )
    note = doc.get("note")
    return (f"{note}\n\n" if note else "") + table(["device", "what", "figure"], rows)


def render_heterogeneity(doc: Doc) -> str:
    """Round policies on the simulated clock: final EM with its interval, simulated time
    to 95% of sync's final EM, and each tier's share of examples that reached the model."""
    setup, verdict = doc.get("setup") or {}, doc.get("verdict") or {}
    runs = doc.get("runs") or []
    tiers = [t["name"] for t in setup.get("tiers") or []]
    rows = []
    for r in runs:
        f = r.get("final") or {}
        em = {
            "mean": f.get("exact_match"),
            "lo": f.get("exact_match_lo"),
            "hi": f.get("exact_match_hi"),
        }
        to_target = r.get("time_to_target_s")
        rows.append(
            [
                r.get("policy"),
                _ci(em),
                num((r.get("sim_time_s") or 0) / 3600),
                "not reached" if to_target is None else num(to_target / 3600),
                num(r.get("time_ratio_to_sync")),
                *[
                    num((r.get("per_tier") or {}).get(t, {}).get("examples_reached_share"))
                    for t in tiers
                ],
            ]
        )
    head = (
        f"{setup.get('clients')} clients ({setup.get('per_round')} per round), "
        f"{setup.get('rounds')} rounds x {setup.get('local_steps')} local steps, generator "
        f"{setup.get('generator')}, {setup.get('eval_questions')} evaluation questions; "
        f"deadline {num(setup.get('deadline_s'))} s ({setup.get('deadline_from')}). "
        f"Target: a deadline or asynchronous policy reaches 95% of sync's final EM "
        f"({num(verdict.get('target_em'), 3)}) in <= {num(verdict.get('target_ratio'))}x "
        f"sync's simulated time: best {num(verdict.get('best_deadline_or_async_ratio'))}x "
        f"{mark(verdict.get('met'))}\n\n"
    )
    header = ["policy", "final EM [95% CI]", "simulated h", "h to target", "x sync"]
    return head + table(header + [f"{t}: examples in model" for t in tiers], rows)


def render_generic(doc: Doc) -> str:
    """Any other result file: its scalar fields, and a ``rows`` list of dicts as a table."""
    skip = {"benchmark", "date", "date_utc", "command", "commit", "machine", "versions"}
    scalars = [
        [k, num(v, 3)]
        for k, v in doc.items()
        if k not in skip and isinstance(v, str | int | float | bool | type(None))
    ]
    out = [table(["field", "value"], scalars)] if scalars else []
    rows = doc.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        cols = [k for k in rows[0] if isinstance(rows[0][k], str | int | float | bool)]
        out.append("\n" + table(cols, [[num(r.get(c), 3) for c in cols] for r in rows]))
    return "\n".join(out) or "(no tabular fields)\n"


RENDERERS: dict[str, Callable[[Doc], str]] = {
    "quality_squad": render_quality_squad,
    "quality_pubmedqa": render_quality_pubmedqa,
    "eval_speed": render_eval_speed,
    "simulation_scale": render_simulation_scale,
    "retrieval": render_retrieval,
    "knowledge_scale": render_knowledge_scale,
    "peer_fedrag": render_peer_fedrag,
    "privacy_robustness": render_privacy_robustness,
    "lsr_context_lm": render_lsr_context_lm,
    "gpu_path": render_gpu_path,
    "heterogeneity": render_heterogeneity,
}

TITLES = {
    "quality_squad": "Quality: federated RALT on SQuAD v1.1",
    "quality_pubmedqa": "Quality: fine-tuning SmolLM2 on PubMedQA",
    "quality_pubmedqa_labels_256steps": "Quality: PubMedQA labels, 256 RALT steps",
    "quality_pubmedqa_long_256steps": "Quality: PubMedQA long answers, 256 RALT steps",
    "eval_speed": "Evaluation speed (KV-cached option scoring)",
    "simulation_scale": "Federated simulation at scale (10³–10⁵ virtual clients)",
    "retrieval": "Retrieval (FAISS indexes, sharding)",
    "knowledge_scale": "Knowledge at scale (served shards, 1M / 10M passages)",
    "peer_fedrag": "Side by side with fed-rag 0.0.27 (SmolLM2 both sides)",
    "peer_fedrag_lsr_k4_epyc": "Side by side with fed-rag: LSR K=4 on a host without fast bf16",
    "peer_fedrag_tiny": "Side by side with fed-rag: tiny random generator",
    "privacy_robustness": "Privacy and robustness (DP, SecAgg+, robust aggregation)",
    "lsr_context_lm": "LSR with a context-reading teacher",
    "lsr_squad_teacher": "LSR on SQuAD: the teacher's ceiling and the retriever's settings",
    "gpu_path": "GPU path",
    "heterogeneity": "Heterogeneous clients: round policies on the simulated clock",
}
ORDER = list(TITLES)


def kind_of(path: Path, doc: Doc) -> str:
    return str(doc.get("benchmark") or path.stem)


def load_results(results: Path = RESULTS) -> list[tuple[Path, Doc]]:
    files = sorted(
        results.glob("*.json"),
        key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem),
    )
    return [(p, json.loads(p.read_text())) for p in files]


def render_section(path: Path, doc: Doc) -> str:
    title = TITLES.get(path.stem, path.stem)
    body = RENDERERS.get(kind_of(path, doc), render_generic)(doc)
    png = path.with_suffix(".png")
    plot = f"\n![{path.stem}](../benchmarks/results/{png.name})\n" if png.exists() else ""
    return f"\n## {title}\n\n`benchmarks/results/{path.name}`\n\n{provenance(doc)}\n{body}{plot}"


def render_docs(results: Path = RESULTS) -> str:
    parts = [
        "# Benchmarks\n\n"
        "<!-- Generated by `python -m benchmarks.report` from benchmarks/results/*.json; do "
        "not edit by hand (tests/test_generated_docs.py checks it). -->\n\n"
        "Not part of `make test`. Each benchmark writes a JSON (and most a PNG) under "
        "`benchmarks/results/` with the command, date, commit, machine and library versions "
        "it ran with; every table below is rendered from those files. Ratios are taken "
        "within one run; absolute seconds depend on the host and its load. How each "
        "measurement is taken, and what it means, is in the design pages linked from the "
        "README.\n"
    ]
    for path, doc in load_results(results):
        parts.append(render_section(path, doc))
    return "".join(parts)


# ---------------------------------------------------------------- README headline table


def _pubmedqa_headline(doc: Doc) -> tuple[list[list[str]], str]:
    runs = {r["run"]: r for r in doc.get("runs", [])}

    def after(run: str, key: str) -> Any:
        return (runs.get(run, {}).get("after") or {}).get(key)

    t = doc.get("targets") or {}
    n = runs.get("zero_shot", {}).get("num_eval")
    rows = [
        [
            "accuracy with retrieval: RALT vs zero-shot RAG",
            f"{num(after('zero_shot', 'accuracy'))} → {num(after('central_ralt', 'accuracy'))}",
            f"≥ majority class {num(t.get('majority_class_rate_of_fold'))}",
            mark(t.get("ralt_accuracy_at_least_majority_class")),
        ],
        [
            "RALT with retrieval vs RALT closed-book",
            f"{num(after('central_ralt', 'accuracy'))} vs "
            f"{num(after('central_ralt', 'closed_book_accuracy'))}",
            "RAG above",
            mark(t.get("ralt_accuracy_above_trained_closed_book")),
        ],
        [
            "stretch: RALT accuracy",
            num(after("central_ralt", "accuracy")),
            "≥ 0.60",
            mark(t.get("ralt_accuracy_at_least_0.60 (stretch)")),
        ],
        [
            "recall@5 after LSR (default posterior teacher)",
            f"{num(after('zero_shot', 'recall@5'))} → {num(after('central_lsr', 'recall@5'))}",
            "drop ≤ 0.01",
            mark((t.get("lsr_recall@5_drop (target <= 0.01)") or 0) <= 0.01),
        ],
        [
            "federated (8 IID clients) vs centralized, both",
            f"{num(after('fed8_iid_both', 'accuracy'))} vs "
            f"{num(after('central_both', 'accuracy'))}",
            "gap ≤ 0.02",
            mark((t.get("fed_iid_vs_central_both_accuracy_gap (target <= 0.02)") or 0) <= 0.02),
        ],
        [
            "QLoRA (4-bit base) vs fp32 LoRA, RALT accuracy",
            f"{num(after('central_ralt_4bit', 'accuracy'))} vs "
            f"{num(after('central_ralt', 'accuracy'))}",
            "gap ≤ 0.02",
            mark((t.get("fp32_minus_4bit_ralt_accuracy (target <= 0.02)") or 0) <= 0.02 + 1e-9),
        ],
        [
            "long answers: token F1, RALT vs zero-shot RAG",
            f"{num(after('zero_shot_long', 'f1'), 3)} → {num(after('central_ralt_long', 'f1'), 3)}",
            "higher",
            mark(t.get("long_ralt_f1_above_zero_shot")),
        ],
    ]
    caption = (
        f"PubMedQA PQA-L, {num(n)} held-out questions, SmolLM2-135M-Instruct, "
        f"{num(doc.get('steps_per_run'))} training steps"
    )
    return [r for r in rows if "-" not in r[1].split()][:MAX_HEADLINE_ROWS], caption


def _headline_comparisons(comps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most ``MAX_HEADLINE_ROWS``, in their order: every comparison with a target first
    (a missed target is never cut from the README), then those without one."""
    room = max(0, MAX_HEADLINE_ROWS - sum(1 for c in comps if c.get("target")))
    extra = {id(c) for c in [c for c in comps if not c.get("target")][:room]}
    return [c for c in comps if c.get("target") or id(c) in extra][:MAX_HEADLINE_ROWS]


def headline(results: Path = RESULTS) -> str:
    """The README's results table: ≤ ``MAX_HEADLINE_ROWS`` figures, host and date once."""
    squad = results / "quality_squad.json"
    doc = json.loads(squad.read_text()) if squad.exists() else {}
    if doc.get("comparisons"):  # a partial SQuAD run (no comparison yet) keeps PubMedQA's
        rows = [
            [
                c.get("label", c.get("name")),
                f"{c.get('metric')} {_signed_ci(c)}",
                mark(c.get("win")),
                c.get("target") or "-",
                mark(c.get("met")),
            ]
            for c in _headline_comparisons(doc.get("comparisons") or [])
        ]
        caption = (
            f"SQuAD v1.1, {num(doc.get('eval_questions'))} held-out questions; paired "
            "difference with its 95% bootstrap interval; better = the interval excludes 0; "
            "met = the whole interval clears the target"
        )
        header = ["comparison", "difference [95% CI]", "better", "target", "met"]
    else:
        doc = json.loads((results / "quality_pubmedqa.json").read_text())
        rows, caption = _pubmedqa_headline(doc)
        header = ["figure", "measured", "target", "met"]
    carried = _carried(doc, commits=False)
    measured = "New figures measured" if carried else "Measured"
    caption += (
        f". {measured} on {host_of(doc)}, {date_of(doc)[:10]}, with `{doc.get('command')}`"
        + (f"; carried figures as published {carried}" if carried else "")
        + "; all figures and their provenance: [docs/benchmarks.md](docs/benchmarks.md)."
    )
    return table(header, rows) + f"\n{caption}\n"


def update_readme(text: str, results: Path = RESULTS) -> str:
    if START not in text or END not in text:
        raise ValueError(f"README lacks the {START} / {END} markers")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{headline(results)}{END}{after}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if anything is stale")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    docs = render_docs(args.results)
    readme_now = args.readme.read_text()
    readme = update_readme(readme_now, args.results)
    if args.check:
        stale = [
            p
            for p, new, old in ((args.docs, docs, None), (args.readme, readme, readme_now))
            if (old if old is not None else (p.read_text() if p.exists() else "")) != new
        ]
        for p in stale:
            print(f"{p} is out of date: run python -m benchmarks.report", file=sys.stderr)
        return 1 if stale else 0
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    args.docs.write_text(docs)
    args.readme.write_text(readme)
    print(f"wrote {args.docs} and the results table of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
