"""Heterogeneous clients on the simulated clock (issue 29): synchronous FedAvg, a deadline,
over-selection and FedBuff on the same federation, compared in *simulated* time.

    python benchmarks/heterogeneity.py [--clients 16] [--per-round 8] [--rounds 5]
        [--local-steps 4] [--eval-questions 1000] [--max-train 1600] [--deadline-s S]
        [--over-selection 0.25] [--buffer-size 4] [--policies sync deadline ...]
        [--num-cpus N] [--out benchmarks/results]
    python benchmarks/heterogeneity.py --smoke     # tiny-random, few articles: end to end

Task: the bundled ``squad_federated`` config (SQuAD v1.1, clients by Wikipedia article,
private + public knowledge, the real default generator with LoRA, RALT), resized by the
flags. Clients come in three tiers (``federation.clients.profiles``): fast (speed 1x the
reference 184 tokens/s, 100/20 Mbit/s down/up), medium (0.3x, 20/5) and slow (0.05x,
5/1), 45% / 45% / 10% of the clients (exact counts, seeded). Policies (same seed, same
clients, same data):

  * ``sync``: K clients per round, a round lasts its slowest client;
  * ``deadline``: the same rounds, clients slower than ``deadline_s`` dropped; unless
    ``--deadline-s`` is given it is 1.1 x the slowest fast- or medium-tier task of the
    sync run (so it cuts the slow tier only; the value is recorded);
  * ``over_selection``: ceil(K (1 + o)) sampled, the first K to finish kept;
  * ``fedbuff``: K clients in flight, an update every ``buffer_size`` arrivals,
    staleness-weighted (exponent 0.5), for rounds x K / buffer_size updates (as many
    client updates in the model as the synchronous runs).

Measured per policy: final exact match with its 95% interval (the evaluation's bootstrap:
``exact_match_lo/hi``), simulated time to reach 95% of sync's final EM (and its ratio to
sync's), total simulated time, each tier's share of training examples that reached the
model, wall seconds. Target (issue 29): a deadline or asynchronous policy reaches that
quality in <= 0.5x sync's simulated time, and no policy silently loses a tier's data (the
shares say which do, and by how much).

Writes ``heterogeneity.json`` and ``heterogeneity.png`` (``--smoke``: ``heterogeneity_smoke``
under ``benchmarks/results/tmp/``, git-ignored) (EM against simulated time per
policy; each tier's share of examples that reached the model). Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import REPO, RESULTS, SCRATCH, offline_env, write_json, write_result

POLICIES = ("sync", "deadline", "over_selection", "fedbuff")
TIERS = [
    {"name": "fast", "share": 0.45, "speed": 1.0, "downlink_mbps": 100, "uplink_mbps": 20},
    {"name": "medium", "share": 0.45, "speed": 0.3, "downlink_mbps": 20, "uplink_mbps": 5},
    {"name": "slow", "share": 0.10, "speed": 0.05, "downlink_mbps": 5, "uplink_mbps": 1},
]
QUALITY_SHARE = 0.95  # of sync's final EM
TARGET_RATIO = 0.5


def base_overrides(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The ``squad_federated`` config resized by the flags, with the three tiers."""
    sets: dict[str, Any] = {
        "data.max_train": args.max_train,
        "data.max_eval": args.eval_questions,
        "federation.num_clients": args.clients,
        "federation.clients_per_round": args.per_round,
        "federation.rounds": args.rounds,
        "federation.local_steps": args.local_steps,
        "federation.eval_every": 1,  # a curve against simulated time
        "federation.clients.profiles": TIERS,
        "federation.shard_dir": str(work / "shards"),
        "knowledge_store.path": str(args.store or work / "store"),
        # the curve starts at round 1: round 0 is the zero-shot model, measured by
        # quality_squad's zero_shot row; closed-book answers are no policy's concern
        "eval.before": False,
        "eval.closed_book": False,
    }
    if args.smoke:
        sets |= {
            "generator.model": "tiny-random",
            "generator.max_length": 128,
            "generator.lora.target_modules": ["q_proj", "v_proj"],
            "data.max_articles": 2 * args.clients,
            "train.batch_size": 2,
            "rag.max_new_tokens": 4,
            "eval.k_values": [1, 5],
        }
    return sets


def policy_overrides(
    policy: str, args: argparse.Namespace, deadline_s: float | None
) -> dict[str, Any]:
    if policy == "deadline":
        return {"federation.round_policy": {"type": "deadline", "deadline_s": deadline_s}}
    if policy == "over_selection":
        return {
            "federation.round_policy": {
                "type": "over_selection",
                "over_selection": args.over_selection,
            }
        }
    if policy == "fedbuff":
        m = args.buffer_size or max(1, args.per_round // 2)
        return {
            "federation.round_policy": {"type": "fedbuff", "buffer_size": m},
            "federation.rounds": math.ceil(args.rounds * args.per_round / m),
        }
    return {}


def run_policy(
    policy: str, args: argparse.Namespace, work: Path, deadline_s: float | None
) -> dict[str, Any]:
    """One federated run of ``policy``; its history and summary figures."""
    from fedrag_ray.config import load_config
    from fedrag_ray.federated import run_federated
    from fedrag_ray.preflight import resumable

    sets = base_overrides(args, work) | policy_overrides(policy, args, deadline_s)
    cfg = load_config("squad_federated", sets)
    run_dir = work / "runs" / policy
    done = work / "results" / f"{policy}.json"
    config = cfg.model_dump_json()  # a finished policy is reused only for this config
    if done.exists() and json.loads(done.read_text()).get("config") == config:
        print(f"[{policy}] reusing {done}", flush=True)
        return json.loads(done.read_text())["run"]
    resume = resumable(cfg, run_dir)  # a killed policy goes on from its last round
    t = time.perf_counter()
    res = run_federated(cfg, run_dir, num_cpus=args.num_cpus, resume=resume)
    run = _summary(policy, cfg, res, time.perf_counter() - t)
    write_json(done, {"config": config, "run": run})
    return run


def _summary(policy: str, cfg: Any, res: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """What the comparison and the plot read of one policy's run."""
    return {
        "policy": policy,
        "round_policy": res["heterogeneity"]["round_policy"],
        "rounds": cfg.federation.rounds,
        "wall_seconds": wall_s,
        "sim_time_s": res["sim_time"],
        "final": {k: res["metrics_after"].get(k) for k in ("exact_match", "f1")}
        | {
            "exact_match_lo": res["metrics_after"].get("exact_match_lo"),
            "exact_match_hi": res["metrics_after"].get("exact_match_hi"),
        },
        "per_tier": res["heterogeneity"]["per_tier"],
        "stragglers_dropped": sum(h.get("stragglers_dropped", 0) for h in res["history"]),
        "history": [
            {
                k: h.get(k)
                for k in (
                    "round",
                    "sim_seconds",
                    "sim_time",
                    "exact_match",
                    "exact_match_lo",
                    "exact_match_hi",
                    "f1",
                    "train_loss",
                    "staleness_mean",
                    "stragglers_dropped",
                    "seconds",
                )
                if k in h
            }
            | {
                "tasks": [
                    [c["partition-id"], c["tier"], c["sim_seconds"]] for c in h.get("clients", [])
                ]
            }
            for h in res["history"]
        ],
    }


def default_deadline(sync: dict[str, Any]) -> float:
    """1.1 x the slowest fast- or medium-tier task of the sync run."""
    seconds = [s for h in sync["history"] for _p, tier, s in h["tasks"] if tier != "slow"]
    return 1.1 * max(seconds)


def time_to_quality(run: dict[str, Any], target: float) -> float | None:
    """Simulated seconds until the first evaluation at or above ``target``."""
    for h in run["history"]:
        if h.get("exact_match") is not None and h["exact_match"] >= target:
            return float(h.get("sim_time") or 0.0)
    return None


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each policy's time to 95% of sync's final EM, its ratio to sync's, and the target."""
    sync = next(r for r in runs if r["policy"] == "sync")
    target = QUALITY_SHARE * (sync["final"]["exact_match"] or 0.0)
    t_sync = time_to_quality(sync, target)
    for r in runs:
        r["time_to_target_s"] = time_to_quality(r, target)
        r["time_ratio_to_sync"] = (
            r["time_to_target_s"] / t_sync if r["time_to_target_s"] is not None and t_sync else None
        )
        r["tiers_losing_data"] = [
            t for t, f in r["per_tier"].items() if f["examples_reached_share"] < 1.0
        ]
    fast = [
        r["time_ratio_to_sync"]
        for r in runs
        if r["policy"] in ("deadline", "fedbuff") and r["time_ratio_to_sync"] is not None
    ]
    return {
        "target_em": target,
        "sync_time_to_target_s": t_sync,
        "best_deadline_or_async_ratio": min(fast) if fast else None,
        "target_ratio": TARGET_RATIO,
        "met": bool(fast) and min(fast) <= TARGET_RATIO,
    }


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    import numpy as np
    from harness.plots import figure, save

    from fedrag_ray.plots import sim_time_panel

    fig, (left, right) = figure(2, size=(12, 4.2))
    sim_time_panel(left, {r["policy"]: r["history"] for r in runs}, "exact_match", title)
    tiers = [t["name"] for t in TIERS]
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        shares = [r["per_tier"][t]["examples_reached_share"] for t in tiers]
        right.bar(np.arange(len(tiers)) + i * width, shares, width, label=r["policy"])
    right.set_xticks(np.arange(len(tiers)) + width * (len(runs) - 1) / 2, tiers)
    right.set_ylim(0, 1.05)
    right.set_ylabel("share of the tier's examples that reached the model")
    right.legend(fontsize=7)
    right.grid(alpha=0.3, axis="y")
    save(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-round", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--eval-questions", type=int, default=1000)
    ap.add_argument("--max-train", type=int, default=1600, help="~100 questions per client")
    ap.add_argument("--deadline-s", type=float, default=None)
    ap.add_argument("--over-selection", type=float, default=0.25)
    ap.add_argument("--buffer-size", type=int, default=None, help="default: per-round / 2")
    ap.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--smoke", action="store_true", help="tiny-random, few articles, fast")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="run directories (default: temp, removed); with it, a killed benchmark "
        "reuses finished policies whose config is unchanged and resumes the one cut short",
    )
    ap.add_argument(
        "--store",
        type=Path,
        default=REPO / "runs" / "stores" / "squad",
        help="the global index (quality_squad's; reused when its provenance matches)",
    )
    args = ap.parse_args()
    if args.smoke:
        # 10 clients: 5 fast, 4 medium, 1 slow (the fewest with every tier present)
        args.clients, args.per_round = min(args.clients, 10), min(args.per_round, 4)
        args.rounds, args.local_steps = min(args.rounds, 2), 1
        args.eval_questions, args.max_train = min(args.eval_questions, 12), 80
        args.store = None  # the smoke run's tiny corpus gets its own index
        if args.out == RESULTS:  # a smoke run's figures are no result: scratch, ignored
            args.out = SCRATCH
    if "sync" not in args.policies:
        raise SystemExit("--policies: sync is the baseline every other policy is compared to")
    offline_env()
    sys.path.insert(0, str(REPO))
    work = args.work or Path(tempfile.mkdtemp(prefix="fedrag-het-"))
    t_all = time.perf_counter()
    runs = [run_policy("sync", args, work, None)]
    deadline_s = args.deadline_s or default_deadline(runs[0])
    for policy in [p for p in POLICIES if p in args.policies and p != "sync"]:
        print(f"=== {policy}", flush=True)
        runs.append(run_policy(policy, args, work, deadline_s))
    verdict = compare(runs)
    name = "heterogeneity_smoke" if args.smoke else "heterogeneity"
    payload = {
        "setup": {
            "task": "squad_federated",
            "generator": "tiny-random" if args.smoke else "default",
            "clients": args.clients,
            "per_round": args.per_round,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "eval_questions": args.eval_questions,
            "max_train": args.max_train,
            "tiers": TIERS,
            "reference_tokens_per_s": 184.0,
            "deadline_s": deadline_s,
            "deadline_from": "flag" if args.deadline_s else "1.1 x slowest non-slow sync task",
            "over_selection": args.over_selection,
            "num_cpus": args.num_cpus,
        },
        "verdict": verdict,
        "runs": runs,
        "total_seconds": time.perf_counter() - t_all,
    }
    path = write_result(name, payload, args.out)
    plot(runs, args.out / f"{name}.png", "squad_federated")
    print(f"wrote {path}")
    for r in runs:
        f = r["final"]
        ratio = r["time_ratio_to_sync"]
        shares = {t: round(v["examples_reached_share"], 3) for t, v in r["per_tier"].items()}
        print(
            f"{r['policy']:>15}: EM {f['exact_match']:.3f} [{f['exact_match_lo']:.3f}, "
            f"{f['exact_match_hi']:.3f}]  simulated {r['sim_time_s']:,.1f} s  to target: "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} sync's  examples in model: {shares}"
        )
    print(verdict)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
