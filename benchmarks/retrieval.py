"""Retrieval benchmark: FAISS flat / IVF / HNSW through fedrag_ray's KnowledgeStore,
single index vs. sharded, against a NumPy brute-force baseline.

    python benchmarks/retrieval.py [--sizes 100000 1000000] [--queries 1000]
                                   [--out benchmarks/results]

Data: synthetic 384-d float32 vectors, L2-normalised, seeded. They are *clustered* (a
Gaussian mixture of 1000 centres with anisotropic noise), not uniform noise, so that ANN
recall numbers mean something: in uniform high-dimensional noise every point is about
equally far from every other and no ANN index can do better than scanning. Queries are
fresh draws from the same mixture (not copies of database vectors). The seed is the same
for every N, so a smaller N's data set is a prefix of a larger one.

Every (N, index, shards) configuration is built and searched in its own subprocess, so
that its peak RSS (VmHWM) is its own and not the high-water mark of whatever ran
before it. The data set is generated once per N, written to a temporary directory, and
loaded by each worker.

Measured per configuration:
  * build s   -- KnowledgeStore.add() + KnowledgeStore.build() (the add is a copy of the
                 vectors into the store; build trains/adds the FAISS index). Creating the
                 Passage objects is timed separately (passages_s).
  * qps       -- queries per second for one batch of --queries queries at k=10, best of
                 up to 3 repeats (repeats stop once 3 s have been spent).
  * recall@10 -- |top-10 ∩ exact top-10| / 10, averaged over queries; "exact" is the
                 single flat (IndexFlatIP) KnowledgeStore of the same N (or, for a capped
                 HNSW build, exact flat search over the same capped subset).
  * peak RSS  -- the worker's VmHWM (data + passages + store copy + index + search).
  * speedup   -- qps / qps of the NumPy brute-force baseline at the same N, same run.

The machine this runs on may be shared and noisy: compare ratios within one run, not
absolute numbers across runs.

Notes on parameters (all also recorded in the JSON):
  * IVF: nlist per index (per shard when sharded) = round(4*sqrt(vectors in that index)),
    capped at --ivf-max-nlist (default 1024) because k-means training cost grows as
    N*nlist and 4*sqrt(1M)=4000 lists would take >10 min to train on 2 cores. nprobe is
    swept (default 8, 32) by setting ``nprobe`` on each built shard after build; nprobe
    applies per shard, so a 4-shard IVF scans ~4x as many lists as one index.
  * HNSW: M=32 (efConstruction = FAISS default 40). efSearch is swept (FAISS default 16,
    then 128) by setting ``hnsw.efSearch`` on each shard after build.
  * Parameter sweeps reach into KnowledgeStore's private ``_shards`` (the per-shard FAISS
    indexes it keeps alive under IndexShards); KnowledgeStore only exposes nprobe at
    construction time and no efSearch at all.
  * HNSW build time is measured at the smallest N, extrapolated as N log N, and if a
    larger N would exceed --hnsw-max-build-s (default 300 s; each N builds HNSW twice,
    single and sharded, and the whole run should stay within ~25 min on 2 cores) the HNSW
    index at that N is built on the first n vectors only, n chosen so that one build is
    expected to take about --hnsw-capped-build-s (default 180 s). The row then says so
    (n_indexed < N, "capped") and the JSON records the extrapolated full-N build time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import RESULTS, git, machine_info, process_tree, provenance, write_json

DIM = 384
K = 10
N_CENTRES = 1000
NOISE_NORM = 1.25  # expected norm of a point's offset from its (unit-norm) centre
SEED = 1234
N_SHARDS = 4


# --------------------------------------------------------------------------- data


def _noise_basis(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation and a power-law spectrum (variance of component i ∝ 1/(i+1)), so
    the noise has a low effective dimension, like real embedding clouds."""
    q, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    var = 1.0 / np.arange(1, DIM + 1)
    scale = np.sqrt(var / var.sum()) * NOISE_NORM
    return (scale[:, None] * q.T).astype(np.float32), var


def make_mixture(n: int, seed: int, centres: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """n points: unit centre + rotated anisotropic Gaussian noise, then L2-normalised."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), dtype=np.float32)
    chunk = 100_000
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        labels = rng.integers(0, len(centres), size=m)
        noise = rng.standard_normal((m, DIM), dtype=np.float32) @ basis
        x = centres[labels] + noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start : start + m] = x
    return out


def make_dataset(n: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((N_CENTRES, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis, _ = _noise_basis(rng)
    db = make_mixture(n, seed + 1, centres, basis)
    queries = make_mixture(n_queries, seed + 2, centres, basis)
    return db, queries


# --------------------------------------------------------------------------- baselines


def numpy_search(db: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65_536):
    """Exact inner-product top-k: chunked matmul + argpartition, running merge."""
    nq = len(queries)
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    rows = np.arange(nq)[:, None]
    for start in range(0, len(db), chunk):
        scores = queries @ db[start : start + chunk].T
        kk = min(k, scores.shape[1])
        part = np.argpartition(scores, -kk, axis=1)[:, -kk:]
        cand_s = np.concatenate([best_s, scores[rows, part]], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        sel = np.argpartition(cand_s, -k, axis=1)[:, -k:]
        best_s, best_i = cand_s[rows, sel], cand_i[rows, sel]
    order = np.argsort(-best_s, axis=1)
    return best_s[rows, order], best_i[rows, order]


def recall_at_k(found: np.ndarray, exact: np.ndarray, k: int = K) -> float:
    hits = 0
    for f, e in zip(found[:, :k], exact[:, :k], strict=True):
        hits += len(np.intersect1d(f[f >= 0], e, assume_unique=True))
    return hits / (len(exact) * k)


def peak_rss_mib() -> float:
    """This process's RSS high-water mark. VmHWM (per address space, reset by exec) rather
    than ru_maxrss, which Linux carries over from the forking parent across exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mib() -> float:
    return process_tree()[0].memory_info().rss / 2**20


def timed_search(fn, min_total_s: float = 3.0, max_reps: int = 3):
    """Best-of-repeats wall time for one batch search; returns (best_s, all_s, result)."""
    times, result = [], None
    while len(times) < max_reps and (not times or sum(times) < min_total_s):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), times, result


# --------------------------------------------------------------------------- worker


def run_worker(spec_path: str) -> None:
    """Build one KnowledgeStore config (or the NumPy baseline), search, write rows."""
    import faiss

    from fedrag_ray.data import Passage
    from fedrag_ray.knowledge_store import KnowledgeStore

    rss_imports = current_rss_mib()  # importing fedrag_ray (and what it pulls in)
    spec = json.loads(Path(spec_path).read_text())
    tmp = Path(spec["tmp"])
    n_index = spec["n_indexed"]
    db = np.load(tmp / "db.npy", mmap_mode="r")[:n_index]
    db = np.ascontiguousarray(db)
    queries = np.load(tmp / "queries.npy")
    nq = len(queries)
    rows = []
    base = {"n_indexed": n_index, "threads": faiss.omp_get_max_threads()}

    if spec["index"] == "numpy":
        rss0 = current_rss_mib()
        best, times, (_, ids) = timed_search(lambda: numpy_search(db, queries, K))
        np.save(tmp / f"{spec['tag']}.npy", ids)
        rows.append(
            dict(
                base,
                params={},
                build_s=0.0,
                search_s=best,
                search_times_s=times,
                qps=nq / best,
                ids=f"{spec['tag']}.npy",
                rss_before_build_mib=rss0,
            )
        )
    else:
        t0 = time.perf_counter()
        passages = [Passage(str(i), "", str(i)) for i in range(n_index)]
        passages_s = time.perf_counter() - t0
        rss0 = current_rss_mib()
        store = KnowledgeStore(
            DIM,
            index=spec["index"],
            n_shards=spec["n_shards"],
            nlist=spec.get("nlist", 64),
            nprobe=spec["sweep"][0] if spec["index"] == "ivf" else 8,
            hnsw_m=spec.get("hnsw_m", 32),
        )
        t0 = time.perf_counter()
        store.add(passages, db)
        add_s = time.perf_counter() - t0
        del db  # the store holds its own copy
        t0 = time.perf_counter()
        store.build()
        build_only_s = time.perf_counter() - t0
        shard_sizes = [int(s.ntotal) for s in store._shards]
        sweep = spec["sweep"] or [None]
        for value in sweep:
            params = {}
            for shard in store._shards:  # private: KnowledgeStore has no setter for these
                if spec["index"] == "ivf":
                    shard.nprobe = min(value, shard.nlist)
                    params = {"nlist_per_shard": int(shard.nlist), "nprobe": int(shard.nprobe)}
                elif spec["index"] == "hnsw":
                    shard.hnsw.efSearch = value
                    params = {
                        "M": spec["hnsw_m"],
                        "efConstruction": int(shard.hnsw.efConstruction),
                        "efSearch": int(shard.hnsw.efSearch),
                    }
            best, times, (_, ids) = timed_search(lambda: store.search(queries, K))
            tag = f"{spec['tag']}_{value}" if value is not None else spec["tag"]
            np.save(tmp / f"{tag}.npy", ids)
            rows.append(
                dict(
                    base,
                    params=params,
                    build_s=add_s + build_only_s,
                    add_s=add_s,
                    index_build_s=build_only_s,
                    passages_s=passages_s,
                    shard_sizes=shard_sizes,
                    search_s=best,
                    search_times_s=times,
                    qps=nq / best,
                    ids=f"{tag}.npy",
                    rss_before_build_mib=rss0,
                )
            )
    for row in rows:
        row["peak_rss_mib"] = peak_rss_mib()
        row["rss_after_imports_mib"] = rss_imports
    Path(spec["result"]).write_text(json.dumps(rows))


# --------------------------------------------------------------------------- driver


def machine_extras() -> dict:
    """What this benchmark records beyond ``harness.machine_info`` (key names as in its
    earlier results, which ``--render-only`` reads)."""
    import faiss
    import psutil

    return {
        "logical_cpus": os.cpu_count(),
        "physical_cpus": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": None,
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "git_commit": git("rev-parse", "HEAD"),
        "loadavg_at_start": list(os.getloadavg()),
    }


def run_config(spec: dict, tmp: Path, log) -> list[dict]:
    spec = dict(spec, tmp=str(tmp), result=str(tmp / f"{spec['tag']}.result.json"))
    spec_path = tmp / f"{spec['tag']}.spec.json"
    spec_path.write_text(json.dumps(spec))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(spec_path)], capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        log(f"  !! worker failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return []
    rows = json.loads(Path(spec["result"]).read_text())
    for row in rows:
        row["worker_wall_s"] = wall
        row["loadavg_1m_at_start"] = load  # machine is shared: a high value = noisy timing
    log(
        f"  {spec['tag']}: worker wall {wall:.1f}s, build {rows[0]['build_s']:.1f}s, "
        + ", ".join(f"{r['params']} qps={r['qps']:.0f}" for r in rows)
    )
    return rows


def hnsw_cap(n: int, ref_n: int | None, ref_build_s: float | None, args) -> tuple[int, float]:
    """(vectors to index, extrapolated full-N build seconds) for HNSW at size n."""
    if ref_n is None or n <= ref_n:
        return n, float("nan")

    def est(m: int) -> float:
        return ref_build_s * (m / ref_n) * (math.log(m) / math.log(ref_n))

    full = est(n)
    if full <= args.hnsw_max_build_s:
        return n, full
    m = ref_n
    while m + 50_000 <= n and est(m + 50_000) <= args.hnsw_capped_build_s:
        m += 50_000
    return m, full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--ef-search", type=int, nargs="+", default=[16, 128])
    ap.add_argument("--ivf-max-nlist", type=int, default=1024)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--hnsw-max-build-s", type=float, default=300.0)
    ap.add_argument("--hnsw-capped-build-s", type=float, default=180.0)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="re-derive speedups, re-plot and re-print from OUT/retrieval.json",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        run_worker(args.worker)
        return
    if args.render_only:
        render(json.loads((Path(args.out) / "retrieval.json").read_text()), Path(args.out))
        return

    import faiss

    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = provenance("retrieval")

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    info = {**machine_info(gpu=False), **machine_extras()}
    log(
        f"machine: {info['cpu_model']}, {info['logical_cpus']} cpus, {info['ram_gib']} GiB, "
        f"faiss {info['faiss']} ({info['faiss_omp_threads']} threads)"
    )
    results: list[dict] = []
    caps: list[str] = []
    hnsw_ref: tuple[int | None, float | None] = (None, None)
    for n in sorted(args.sizes):
        tmp = Path(tempfile.mkdtemp(prefix=f"retrieval_bench_{n}_"))
        try:
            t0 = time.perf_counter()
            db, queries = make_dataset(n, args.queries, args.seed)
            np.save(tmp / "db.npy", db)
            np.save(tmp / "queries.npy", queries)
            del db
            log(f"N={n}: data generated in {time.perf_counter() - t0:.1f}s")
            size_rows: list[dict] = []

            def add(spec, rows, _n=n, _rows=size_rows):
                for r in rows:
                    r.update(N=_n, index=spec["index"], shards=spec["n_shards"])
                    _rows.append(r)

            # exact references first: flat single is ground truth
            specs = [
                {"tag": "flat_1", "index": "flat", "n_shards": 1, "sweep": []},
                {"tag": "numpy", "index": "numpy", "n_shards": 1, "sweep": []},
                {"tag": f"flat_{N_SHARDS}", "index": "flat", "n_shards": N_SHARDS, "sweep": []},
            ]
            for shards in (1, N_SHARDS):
                per_shard = n // shards
                nlist = min(round(4 * math.sqrt(per_shard)), args.ivf_max_nlist)
                specs.append(
                    {
                        "tag": f"ivf_{shards}",
                        "index": "ivf",
                        "n_shards": shards,
                        "nlist": nlist,
                        "sweep": args.nprobe,
                        "nlist_rule": "round(4*sqrt(vectors per shard))",
                        "nlist_uncapped": round(4 * math.sqrt(per_shard)),
                    }
                )
            for spec in specs:
                spec["n_indexed"] = n
                add(spec, run_config(spec, tmp, log))

            gt = np.load(tmp / "flat_1.npy")
            # HNSW, possibly on a capped prefix of the data
            n_h, est_full = hnsw_cap(n, *hnsw_ref, args)
            gt_h = gt
            if n_h < n:
                msg = (
                    f"HNSW at N={n}: full build extrapolated to {est_full:.0f}s per index "
                    f"(> {args.hnsw_max_build_s:.0f}s) from N={hnsw_ref[0]}; built on the "
                    f"first {n_h} vectors instead, recall vs exact flat over those {n_h}"
                )
                caps.append(msg)
                log(msg)
                sub = np.load(tmp / "db.npy", mmap_mode="r")[:n_h]
                flat = faiss.IndexFlatIP(DIM)
                flat.add(np.ascontiguousarray(sub))
                gt_h = flat.search(np.load(tmp / "queries.npy"), K)[1]
                del flat, sub
            for shards in (1, N_SHARDS):
                spec = {
                    "tag": f"hnsw_{shards}",
                    "index": "hnsw",
                    "n_shards": shards,
                    "hnsw_m": args.hnsw_m,
                    "sweep": args.ef_search,
                    "n_indexed": n_h,
                }
                rows = run_config(spec, tmp, log)
                for r in rows:
                    r["hnsw_build_estimate_full_n_s"] = None if math.isnan(est_full) else est_full
                    r["capped"] = n_h < n
                add(spec, rows)
                if shards == 1 and rows and hnsw_ref[0] is None:
                    hnsw_ref = (n_h, rows[0]["index_build_s"])

            for r in size_rows:
                ids = np.load(tmp / r.pop("ids"))
                ref = gt_h if r["index"] == "hnsw" else gt
                r["recall_at_10"] = recall_at_k(ids, ref)
                r.setdefault("capped", False)
                if r["index"] == "numpy":
                    r["matches_flat_exactly"] = bool(
                        np.array_equal(np.sort(ids, 1), np.sort(gt, 1))
                    )
            results.extend(size_rows)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    total = time.perf_counter() - t_start
    info["loadavg_at_end"] = list(os.getloadavg())
    report = {
        **header,
        "date_utc": header["date"],
        "total_runtime_s": total,
        "machine": info,
        "data": {
            "kind": "synthetic clustered (Gaussian mixture), not uniform noise",
            "dim": DIM,
            "dtype": "float32",
            "normalised": "L2, searched by inner product (= cosine)",
            "centres": f"{N_CENTRES} random unit vectors",
            "noise": (
                "Gaussian, random rotation, power-law spectrum (variance of component "
                f"i ∝ 1/(i+1)), expected norm {NOISE_NORM}, then re-normalised"
            ),
            "queries": f"{args.queries} fresh draws from the same mixture",
            "seed": args.seed,
        },
        "method": {
            "k": K,
            "built_through": "fedrag_ray.knowledge_store.KnowledgeStore (add + build + search)",
            "sharded": f"n_shards={N_SHARDS} -> faiss.IndexShards(threaded=False)",
            "param_sweep_note": (
                "nprobe / hnsw.efSearch set on KnowledgeStore._shards (private) "
                "after build; KnowledgeStore has no public setter"
            ),
            "qps": "batch of all queries in one search call; best of up to 3 repeats",
            "ground_truth": "single-index flat KnowledgeStore of the same N (exact)",
            "peak_rss": (
                "VmHWM of a fresh worker process per configuration; includes the "
                "import baseline (rss_after_imports_mib: fedrag_ray + faiss + numpy)"
            ),
            "ivf_max_nlist": args.ivf_max_nlist,
            "caps": caps,
        },
        "rows": results,
    }
    render(report, out)


def derive(report: dict) -> None:
    """Speedups vs. the NumPy baseline of the same run (and load-average summary)."""
    rows = report["rows"]
    numpy_qps = {r["N"]: r["qps"] for r in rows if r["index"] == "numpy"}
    for r in rows:
        if r.get("capped"):
            # a capped index searched fewer vectors than the N-vector baseline: not comparable
            r["speedup_vs_numpy"] = None
            ref = numpy_qps.get(r["n_indexed"])
            r["speedup_vs_numpy_at_n_indexed"] = r["qps"] / ref if ref else None
        else:
            r["speedup_vs_numpy"] = r["qps"] / numpy_qps[r["N"]] if r["N"] in numpy_qps else None
    report["data"]["nesting"] = (
        "same seed for every N: the N-vector set is the first N vectors of any larger set, so "
        "an index capped at n vectors searches exactly the n-vector data set"
    )
    loads = [r["loadavg_1m_at_start"] for r in rows if "loadavg_1m_at_start" in r]
    if loads:
        report["machine"]["loadavg_1m_during_run"] = {"min": min(loads), "max": max(loads)}


def render(report: dict, out: Path) -> None:
    derive(report)
    results = report["rows"]
    write_json(out / "retrieval.json", report)
    plot(
        results,
        out / "retrieval.png",
        report["machine"].get("loadavg_1m_during_run"),
        report["machine"]["logical_cpus"],
    )
    print(f"wrote {out / 'retrieval.json'} and {out / 'retrieval.png'}\n")
    print(markdown_table(results))
    base = [r["rss_after_imports_mib"] for r in results if "rss_after_imports_mib" in r]
    if base:
        print(
            f"\npeak RSS includes ~{np.median(base):.0f} MiB of import baseline (fedrag_ray "
            "package + faiss + numpy) before any data is loaded"
        )
    load = report["machine"].get("loadavg_1m_during_run")
    if load:
        print(
            f"machine load average (1 min) during the run: {load['min']:.1f}-{load['max']:.1f} "
            f"on {report['machine']['logical_cpus']} CPUs"
        )
    for c in report["method"]["caps"]:
        print(f"* capped: {c}")
    print(f"\ntotal runtime {report['total_runtime_s'] / 60:.1f} min")


def _label(r: dict) -> str:
    p = r["params"]
    if r["index"] == "ivf":
        return f"ivf (nlist={p['nlist_per_shard']}, nprobe={p['nprobe']})"
    if r["index"] == "hnsw":
        s = f"hnsw (M={p['M']}, efSearch={p['efSearch']})"
        if r.get("capped"):
            s += f" [capped: {r['n_indexed']:,} vectors]"
        return s
    if r["index"] == "numpy":
        return "numpy brute force"
    return r["index"]


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| N | index | shards | build s | qps | recall@10 | speedup vs numpy | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("speedup_vs_numpy") is not None:
            speedup = f"{r['speedup_vs_numpy']:.2f}x"
        elif r.get("speedup_vs_numpy_at_n_indexed"):
            speedup = (
                f"n/a (capped; {r['speedup_vs_numpy_at_n_indexed']:.1f}x vs numpy "
                f"at N={r['n_indexed']:,})"
            )
        else:
            speedup = "n/a (capped)"
        lines.append(
            f"| {r['N']:,} | {_label(r)} | {r['shards']} | {r['build_s']:.1f} | "
            f"{r['qps']:,.0f} | {r['recall_at_10']:.3f} | {speedup} | "
            f"{r['peak_rss_mib']:,.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, load: dict | None = None, cpus: int = 0) -> None:
    from harness.plots import figure, rate_axis, save
    from matplotlib.lines import Line2D

    sizes = sorted({r["N"] for r in rows})
    fig, axes = figure(len(sizes), size=(6.5 * len(sizes), 5), squeeze=False)
    colours = {"numpy": "black", "flat": "tab:blue", "ivf": "tab:orange", "hnsw": "tab:green"}
    for ax, n in zip(axes[0], sizes, strict=True):
        for r in (r for r in rows if r["N"] == n):
            marker = "*" if r["index"] == "numpy" else ("o" if r["shards"] == 1 else "^")
            colour = colours[r["index"]]
            if r.get("capped"):  # hollow: indexed fewer than N vectors
                ax.scatter(
                    r["qps"],
                    r["recall_at_10"],
                    marker=marker,
                    s=50,
                    facecolors="none",
                    edgecolors=colour,
                    linewidths=1.5,
                )
            else:
                ax.scatter(
                    r["qps"],
                    r["recall_at_10"],
                    c=colour,
                    marker=marker,
                    s=90 if marker == "*" else 50,
                    edgecolors="k",
                    linewidths=0.4,
                )
            p = r["params"]
            note = (
                f"np={p['nprobe']}"
                if "nprobe" in p
                else f"ef={p['efSearch']}"
                if "efSearch" in p
                else ""
            )
            if note:
                ax.annotate(
                    f"{note}{'/4sh' if r['shards'] > 1 else ''}",
                    (r["qps"], r["recall_at_10"]),
                    fontsize=7,
                    xytext=(4, -9 if r["shards"] > 1 else 4),
                    textcoords="offset points",
                )
        capped = [r for r in rows if r["N"] == n and r.get("capped")]
        title = f"N = {n:,} (384-d, k=10)"
        if capped:
            title += f"\nhollow = HNSW capped at {capped[0]['n_indexed']:,} vectors (not N)"
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        ax.set_xlabel("queries / s (batch, log scale)")
        rate_axis(ax, "recall@10 vs exact flat")
        ax.grid(True, which="both", alpha=0.3)
    handles = [
        Line2D([], [], ls="", marker="*" if k == "numpy" else "o", color=c, label=k)
        for k, c in colours.items()
    ] + [
        Line2D([], [], ls="", marker="o", color="grey", label="single index"),
        Line2D([], [], ls="", marker="^", color="grey", label=f"{N_SHARDS} shards"),
    ]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="lower left")
    fig.suptitle("fedrag_ray KnowledgeStore retrieval: qps vs recall@10", fontsize=11)
    if load:
        fig.text(
            0.5,
            0.005,
            f"shared {cpus}-CPU machine, 1-min load average "
            f"{load['min']:.0f}-{load['max']:.0f} during the run: absolute qps are "
            "depressed and noisy; compare within a panel",
            ha="center",
            fontsize=8,
        )
    save(fig, path, rect=(0, 0.03, 1, 1))


if __name__ == "__main__":
    main()
