"""Privacy and robustness on PubMedQA with the real default generator (SmolLM2-135M).

    python benchmarks/privacy_robustness.py [--data ../shared/data/pubmedqa/pqal_trainval.json]
        [--clients 8] [--rounds 3] [--local-steps 2] [--train-questions 160]
        [--eval-questions 60] [--noise 0.5 1 2 4] [--attack-factor 10] [--out benchmarks/results]

Three parts, every run the same federation (8 clients, all sampled every round, IID,
RA-DIT ``both``: generator LoRA by RALT and query-encoder LoRA by LSR, alternating;
FedAvg unless named), evaluated on the same held-out
questions after the same rounds:

1. **DP**: no DP, then central DP with server-side fixed clipping (Flower's
   ``DifferentialPrivacyServerSideFixedClipping``) at each noise multiplier. The clipping
   norm is the median client update norm of the no-DP run's round 1 (measured, not
   guessed). ε at δ = 1e-5 from the RDP ledger (client-level, no amplification).
2. **SecAgg+**: the no-DP run again under SecAgg+: seconds and bytes per round vs plain
   (bytes = every payload of all four SecAgg+ stages), and the final adapters' distance.
3. **Robustness**: partition 0 sign-flips its update x ``--attack-factor``
   (``FEDRAG_RAY_FAULTS=signflip:0,scale:0×F``); FedAvg vs FedMedian, Krum (f = 1) and
   the trimmed mean (β = 0.2, one client cut at each end): accuracy, recall and the
   distance of the final adapters to the attack-free FedAvg run's.

Writes ``privacy_robustness.json`` and ``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import PUBMEDQA, RESULTS, SCRATCH, TreeCpu, now, offline_env, provenance, write_json

from fedrag_ray.config import config_from_dict

KEYS = ["recall@1", "recall@5", "mrr", "accuracy"]


def base_config(args: argparse.Namespace, store: str) -> dict[str, Any]:
    return {
        "name": "privacy_robustness",
        "seed": 0,
        "data": {
            "format": "pubmedqa",
            "path": str(args.data),
            "eval_fraction": 0.2,
            "split_seed": 0,
            "max_train": args.train_questions,
            "max_eval": args.eval_questions,
        },
        "retriever": {"model": "default", "train": "lora"},
        "generator": {
            "model": args.generator,
            "max_length": args.max_length,
            "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        },
        "knowledge_store": {"index": "flat", "path": store},
        "rag": {"top_k": args.top_k},
        "train": {
            "method": "both",  # RA-DIT, alternating: generator LoRA (RALT) + query LoRA (LSR)
            "batch_size": args.batch_size,
            "lr": args.lr,
            "retriever_lr": args.retriever_lr,
            "ralt": {"k": 1},
            "lsr": {"k": args.top_k, "tau": 0.1, "beta": 1.0},
        },
        "eval": {"k_values": [1, 5], "generate": False, "closed_book": False},
        "federation": {
            "num_clients": args.clients,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "eval_every": args.rounds,
            "min_successes": 1,
            "partition": {"type": "iid"},
            "client_resources": {"num_cpus": 1},
        },
    }


def run(name: str, raw: dict[str, Any], work: Path, faults: str = "") -> dict[str, Any]:
    from fedrag_ray.federated import run_federated

    if faults:
        os.environ["FEDRAG_RAY_FAULTS"] = faults
    else:
        os.environ.pop("FEDRAG_RAY_FAULTS", None)
    t = time.perf_counter()
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
    cpu_marks: dict[int, float] = {}  # round -> tree CPU seconds when it ended (0: initial eval)
    tree_cpu = TreeCpu()

    def on_round(row: dict[str, Any]) -> None:
        cpu_marks[row["round"]] = tree_cpu()

    res = run_federated(config_from_dict(raw), work / name, on_round=on_round)
    os.environ.pop("FEDRAG_RAY_FAULTS", None)
    rounds = [h for h in res["history"] if h["round"] > 0]
    out = {
        "name": name,
        "seconds": time.perf_counter() - t,
        "metrics_before": {k: res["metrics_before"].get(k) for k in KEYS},
        "metrics_after": {k: res["metrics_after"].get(k) for k in KEYS},
        "round_seconds": [h["round_seconds"] for h in rounds],
        # CPU seconds of the whole process tree (driver, Ray, actors) from one round's end to
        # the next: what the round cost, whatever else shares the machine
        "round_cpu_seconds": [
            cpu_marks[h["round"]] - cpu_marks[h["round"] - 1]
            for h in rounds
            if h["round"] - 1 in cpu_marks
        ],
        "bytes_per_round": [h["bytes_sent"] + h["bytes_received"] for h in rounds],
        "train_loss": [h["train_loss"] for h in rounds],
        "failures": [h["failure_reasons"] for h in rounds if h["failure_reasons"]],
        "update_norms_round1": [c.get("update-norm") for c in rounds[0]["clients"]],
        "privacy": res.get("privacy"),
        "epsilon": [h.get("epsilon") for h in rounds],
        "faults": faults or None,
    }
    print(
        f"    {out['seconds']:.0f}s accuracy {out['metrics_after']['accuracy']} "
        f"recall@5 {out['metrics_after']['recall@5']} eps {out['epsilon'][-1]}",
        file=sys.stderr,
        flush=True,
    )
    out["_arrays"] = res["final_arrays"]
    return out


def distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=PUBMEDQA)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=SCRATCH / "privacy_robustness")
    ap.add_argument("--generator", default="default")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--retriever-lr", type=float, default=1e-3)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--train-questions", type=int, default=160)
    ap.add_argument("--eval-questions", type=int, default=60)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--attack-factor", type=float, default=10.0)
    ap.add_argument("--parts", nargs="+", default=["dp", "secagg", "robust"])
    ap.add_argument(
        "--secagg-repeats", type=int, default=1, help="plain / SecAgg+ pairs, alternating"
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the parts of the existing JSON that this invocation does not run",
    )
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON")
    args = ap.parse_args()
    offline_env()
    if args.replot:
        saved = json.loads((args.out / "privacy_robustness.json").read_text())
        plot(saved, args.out / "privacy_robustness.png")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    started = now()
    load_start = os.getloadavg()
    raw = base_config(args, str(args.work / "store"))
    runs: dict[str, dict[str, Any]] = {}

    plain = runs["fedavg"] = run("fedavg", raw, args.work)
    norms = [n for n in plain["update_norms_round1"] if n is not None]
    clip = float(np.median(norms))
    out: dict[str, Any] = {
        **provenance("privacy_robustness"),
        "date": started,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "config": raw,
        "load_average_start": load_start,
    }

    if "dp" in args.parts:
        dp_rows = [
            {"run": "no DP", "noise_multiplier": 0.0, "epsilon": None, **plain["metrics_after"]}
        ]
        for z in args.noise:
            cfg = json.loads(json.dumps(raw))
            cfg["federation"]["privacy"] = {
                "mode": "central",
                "clipping": "server",
                "noise_multiplier": z,
                "clipping_norm": clip,
                "delta": args.delta,
                "noise_seed": 0,
            }
            r = runs[f"dp_z{z:g}"] = run(f"dp_z{z:g}", cfg, args.work)
            dp_rows.append(
                {
                    "run": f"central DP z={z:g}",
                    "noise_multiplier": z,
                    "epsilon": r["epsilon"][-1],
                    "noise_std_on_mean": r["privacy"]["noise_std_on_mean"],
                    "distance_to_no_dp": distance(r["_arrays"], plain["_arrays"]),
                    **r["metrics_after"],
                }
            )
        out["dp"] = {
            "clipping_norm": clip,
            "clipping_norm_from": "median client update L2 norm in round 1 of the no-DP run",
            "update_norms_round1": norms,
            "delta": args.delta,
            "accountant": "RDP (Flower RdpAccountant), client-level, add-or-remove-one, "
            "no amplification by sampling (the sample is public: seeded by the round)",
            "rows": dp_rows,
        }

    if "secagg" in args.parts:
        cfg = json.loads(json.dumps(raw))
        cfg["federation"]["privacy"] = {"secagg": {"enabled": True}}
        s = runs["secagg"] = run("secagg", cfg, args.work)
        plains, secaggs = [plain], [s]
        for i in range(2, args.secagg_repeats + 1):  # alternate: secagg first, then plain
            runs[f"secagg_{i}"] = run(f"secagg_{i}", cfg, args.work)
            runs[f"fedavg_{i}"] = run(f"fedavg_{i}", raw, args.work)
            secaggs.append(runs[f"secagg_{i}"])
            plains.append(runs[f"fedavg_{i}"])

        def steady(xs: list[float]) -> float:
            return float(np.median(xs[1:] if len(xs) > 1 else xs))

        def steady_of(rs: list[dict[str, Any]], key: str) -> float:
            return float(np.median([steady(r[key]) for r in rs]))

        out["secagg"] = {
            "note": "round 1 includes the second actor loading its models; steady = median "
            "of rounds 2..R, then median over the repeats. CPU = seconds of the whole process "
            "tree per round (robust to other load, unlike wall seconds). Plain bytes = "
            "adapters down + up; SecAgg+ bytes = every payload of its four stages (keys, "
            "encrypted shares, masked vectors, unmask shares).",
            "repeats": args.secagg_repeats,
            "plain_round_seconds": [r["round_seconds"] for r in plains],
            "secagg_round_seconds": [r["round_seconds"] for r in secaggs],
            "plain_round_cpu_seconds": [r["round_cpu_seconds"] for r in plains],
            "secagg_round_cpu_seconds": [r["round_cpu_seconds"] for r in secaggs],
            "plain_steady_s": steady_of(plains, "round_seconds"),
            "secagg_steady_s": steady_of(secaggs, "round_seconds"),
            "plain_steady_cpu_s": steady_of(plains, "round_cpu_seconds"),
            "secagg_steady_cpu_s": steady_of(secaggs, "round_cpu_seconds"),
            "cpu_seconds_ratio": steady_of(secaggs, "round_cpu_seconds")
            / steady_of(plains, "round_cpu_seconds"),
            "plain_bytes_per_round": plain["bytes_per_round"][0],
            "secagg_bytes_per_round": s["bytes_per_round"][0],
            "bytes_ratio": s["bytes_per_round"][0] / plain["bytes_per_round"][0],
            "seconds_ratio": steady_of(secaggs, "round_seconds")
            / steady_of(plains, "round_seconds"),
            "final_adapter_distance_to_plain": distance(s["_arrays"], plain["_arrays"]),
            "final_adapter_norm_plain": float(
                np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in plain["_arrays"].values()))
            ),
            "metrics_plain": plain["metrics_after"],
            "metrics_secagg": s["metrics_after"],
        }

    if "robust" in args.parts:
        faults = f"signflip:0,scale:0×{args.attack_factor:g}"
        rows = [
            {"strategy": "fedavg, no attack", **plain["metrics_after"], "distance_to_clean": 0.0}
        ]
        strategies = {
            "fedavg": {"name": "fedavg"},
            "fedmedian": {"name": "fedmedian"},
            "krum": {"name": "krum", "num_malicious_nodes": 1},
            "fedtrimmedavg": {"name": "fedtrimmedavg", "trim_beta": 0.2},
        }
        for name, strat in strategies.items():
            cfg = json.loads(json.dumps(raw))
            cfg["federation"]["strategy"] = strat
            r = runs[f"attack_{name}"] = run(f"attack_{name}", cfg, args.work, faults)
            rows.append(
                {
                    "strategy": f"{name}, 1 of {args.clients} sign-flipping "
                    f"x{args.attack_factor:g}",
                    **r["metrics_after"],
                    "train_loss_last_round": r["train_loss"][-1],
                    "distance_to_clean": distance(r["_arrays"], plain["_arrays"]),
                }
            )
        out["robust"] = {"faults": faults, "rows": rows}

    out["runs"] = {k: {x: y for x, y in v.items() if x != "_arrays"} for k, v in runs.items()}
    saved_path = args.out / "privacy_robustness.json"
    if args.merge and saved_path.exists():  # the parts not run here stay as measured before
        saved = json.loads(saved_path.read_text())
        for part in ("dp", "secagg", "robust"):
            if part not in out and part in saved:
                out[part] = saved[part]
                out.setdefault("kept_from_earlier_run", {})[part] = saved.get("date")
        out["runs"] = {**saved.get("runs", {}), **out["runs"]}
        out["earlier_command"] = saved.get("command")
    out["total_minutes"] = (time.perf_counter() - t0) / 60
    out["load_average_end"] = os.getloadavg()
    write_json(args.out / "privacy_robustness.json", out)
    plot(out, args.out / "privacy_robustness.png")
    print(
        json.dumps(
            {k: out[k] for k in ("dp", "secagg", "robust") if k in out}, indent=1, default=str
        )
    )


def plot(out: dict[str, Any], path: Path) -> None:
    from harness.plots import figure, rate_axis, save, zero_based

    fig, axes = figure(3, size=(15, 4))
    if "dp" in out:
        ax = axes[0]
        rows = out["dp"]["rows"]
        dp = [r for r in rows if r["epsilon"] is not None]
        ax.plot([r["epsilon"] for r in dp], [r["accuracy"] for r in dp], "o-", label="accuracy, DP")
        ax.plot([r["epsilon"] for r in dp], [r["recall@5"] for r in dp], "s:", label="recall@5, DP")
        ax.axhline(rows[0]["recall@5"], color="tab:orange", ls="--", label="recall@5, no DP")
        for r in dp:
            ax.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon"], r["accuracy"]), fontsize=8)
        ax.axhline(rows[0]["accuracy"], color="k", ls="--", label="accuracy, no DP")
        ax.set_xscale("log")
        ax.set_xlabel(f"ε at δ={out['dp']['delta']:g} (RDP, no amplification)")
        rate_axis(ax, "held-out")
        ax.set_title("accuracy vs privacy")
        ax.legend(fontsize=7)
    if "secagg" in out:
        ax = axes[1]
        s = out["secagg"]
        ax.bar(["plain s/round", "SecAgg+ s/round"], [s["plain_steady_s"], s["secagg_steady_s"]])
        ax2 = ax.twinx()
        ax2.bar(
            ["plain MiB/round", "SecAgg+ MiB/round"],
            [s["plain_bytes_per_round"] / 2**20, s["secagg_bytes_per_round"] / 2**20],
            color="tab:orange",
        )
        zero_based(ax)
        zero_based(ax2)
        ax.set_title("SecAgg+ cost (steady rounds)")
        ax.tick_params(axis="x", rotation=20)
    if "robust" in out:
        ax = axes[2]
        rows = out["robust"]["rows"]
        labels = [
            r["strategy"].split(",")[0] + (" (clean)" if i == 0 else "") for i, r in enumerate(rows)
        ]
        x = np.arange(len(rows))
        ax.bar(x - 0.2, [r["accuracy"] for r in rows], 0.4, label="accuracy")
        ax.bar(x + 0.2, [r["recall@5"] for r in rows], 0.4, label="recall@5")
        ax.set_xticks(x, labels, rotation=20)
        rate_axis(ax)
        ax.set_title(out["robust"]["faults"])
        ax.legend(loc="lower left", fontsize=7)
        ax3 = ax.twinx()
        ax3.plot(x, [r["distance_to_clean"] for r in rows], "kD", label="L2 to clean adapters")
        ax3.set_ylabel("L2 distance of final adapters to clean FedAvg")
        ax3.legend(loc="lower right", fontsize=7)
        zero_based(ax3)
    save(fig, path)


if __name__ == "__main__":
    main()
