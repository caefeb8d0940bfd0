"""The peer (fed-rag 0.0.27) doing RALT on quality_squad's SQuAD task, beside our rows.

    python benchmarks/peer_ralt_squad.py [--steps 100] [--eval 1000] [--attn default|eager]
        [--prompt ralt|generator] [--threads 1] [--before] [--max-articles N] [--out DIR]

Same task as ``benchmarks/quality_squad.py``'s ``ralt_s0`` row (this script builds its
config with that benchmark's own overrides): the same training questions and target
answers, the same held-out questions (all gold answers), every SQuAD paragraph in the
store, generator LoRA r 16 / alpha 32 on q/k/v/o, batch 8, the same steps, lr 1e-3 with
5 warmup steps and cosine decay to 0.1 x, top-1 retrieved passage, 16 new tokens, SmolLM2
(the same weights, converted for the peer's transformers by ``peer.prepare``) and MiniLM.
What stays the peer's own: its prompt and RALT example template, its labels (the whole
sequence, not the answer), its retrieval (fed-rag's in-memory store), no truncation.

The peer trains and answers in its own venv (``peer/ralt_squad_peer.py``); answers are
scored here with fedrag_ray's EM / F1 (official normalisation, best over gold answers,
first line) and recall@1, each with its 95% bootstrap interval, and compared, paired on
the same questions, with quality_squad's ``zero_shot`` / ``ralt_s*`` rows when their run
directories (``--runs``, default ``runs/quality_squad``) hold the same questions.

``--attn default`` is fed-rag as shipped: on CPU its RALT gradient overflows (``grad_norm``
inf, nothing trains; ``peer/README.md``, "grad_norm: inf"); ``--attn eager`` is the
workaround a fed-rag user has. Writes ``OUT/peer_ralt_squad[_<attn>].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

from harness import REPO, SCRATCH, offline_env, write_result
from peer import squad_task
from peer.job import ENV, PEER_DIR, PEER_PY
from peer.prepare import ensure_generator, ensure_peer_venv

WORK = SCRATCH / "peer_ralt_squad"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval", type=int, default=1000, help="validation questions")
    ap.add_argument("--max-articles", type=int, default=None, help="smoke runs: fewer articles")
    ap.add_argument(
        "--max-questions", type=int, default=None, help="smoke runs: the first N of --eval"
    )
    ap.add_argument("--attn", choices=["default", "eager"], default="default")
    ap.add_argument("--prompt", choices=["ralt", "generator"], default="ralt")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the peer process")
    ap.add_argument("--before", action="store_true", help="also evaluate the untrained peer")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "quality_squad")
    ap.add_argument("--out", type=Path, default=None, help="result folder")
    ap.add_argument("--name", default=None, help="result name (default from --attn)")
    args = ap.parse_args()
    offline_env()
    ensure_peer_venv()
    WORK.mkdir(parents=True, exist_ok=True)
    generator = ensure_generator(WORK.parent / "peer_fedrag", "smollm2")
    cfg = squad_task.squad_config(args.eval, args.steps, args.max_articles, args.max_questions)
    scope = (
        f"e{args.eval}-q{args.max_questions or 'all'}-s{args.steps}-a{args.max_articles or 'all'}"
    )
    job_path = WORK / f"job-{scope}.json"
    job = squad_task.export_job(cfg, job_path)
    peer_out = WORK / f"peer-{args.attn}-{args.prompt}-{scope}.json"
    cmd = [
        str(PEER_PY),
        str(PEER_DIR / "ralt_squad_peer.py"),
        *("--job", str(job_path), "--generator", str(generator), "--work", str(WORK)),
        *("--out", str(peer_out), "--attn", args.attn, "--prompt", args.prompt),
        *("--threads", str(args.threads), *(["--before"] if args.before else [])),
    ]
    threads = str(args.threads)
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    print(
        f"peer: {len(job['train'])} training questions, {len(job['eval'])} held out, "
        f"{len(job['passages'])} passages, {args.steps} steps",
        flush=True,
    )
    t = time.time()
    subprocess.run(cmd, check=True, env=env)
    wall = time.time() - t
    peer = json.loads(peer_out.read_text())
    ids = [q["id"] for q in job["eval"]]
    after = squad_task.score(job, peer["predictions_after"])
    payload = {
        "task": {
            "as": "quality_squad ralt_s0",
            "train_questions": len(job["train"]),
            "eval_questions": len(job["eval"]),
            "passages": len(job["passages"]),
            "max_articles": args.max_articles,
            "max_questions": args.max_questions,
            "settings": job["settings"],
        },
        "peer": {k: v for k, v in peer.items() if not k.startswith("predictions")},
        "wall_s": wall,
        "metrics_after": squad_task.summary(after),
        "comparisons": squad_task.comparisons(after, ids, args.runs),
        "per_question_after": after,
        "predictions_after": [p["response"] for p in peer["predictions_after"]],
        "eval_ids": ids,
    }
    if "predictions_before" in peer:
        before = squad_task.score(job, peer["predictions_before"])
        payload["metrics_before"] = squad_task.summary(before)
        payload["per_question_before"] = before
    name = args.name or f"peer_ralt_squad_{args.attn}"
    path = write_result(name, payload, **({"out_dir": args.out} if args.out else {}))
    m = payload["metrics_after"]
    print(
        f"wrote {path}: EM {m['exact_match']['mean']:.3f} F1 {m['f1']['mean']:.3f} "
        f"recall@1 {m['recall@1']['mean']:.3f}; grad norms "
        f"{[e.get('grad_norm') for e in peer['step_log']]}",
        flush=True,
    )


if __name__ == "__main__":
    main()
