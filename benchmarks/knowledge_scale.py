"""Knowledge at scale: a global index served by Ray shard actors vs a copy in every
client actor, on synthetic 384-d corpora of 1M and 10M passages.

    python benchmarks/knowledge_scale.py [--sizes 1000000 10000000] [--clients 8]
                                         [--shards 4] [--queries 256] [--out DIR]

Per size N (1M: exact flat index; 10M: IVF-PQ, trained once on a sample and cloned
into every shard), measured in one run on one Ray:

* build s        -- generating the vectors chunk by chunk and streaming them into the
                    sharded store (``knowledge_store.write_store``: linear, one chunk in
                    memory), exact top-10 ground truth computed on the same pass;
* client actor   -- K client actors (``ClientProbe``) each connected to the served
  memory           index (``ServedStore``) and searching: resident memory added per actor
                    (RSS after connecting and searching minus RSS before). The local-copy
                    baseline is what ``serve: local`` does today, ``KnowledgeStore.load``
                    in the actor, measured in ONE actor (K copies of 1M would not fit in
                    24 GiB; K x the one-actor figure is reported as a projection, marked);
* qps / recall   -- queries per second at k=10 (batches of 16) through the served index
                    and through the same FAISS shards loaded in one local process (same
                    index, one FAISS thread per shard actor and in the local process),
                    recall@10 of both against the exact ground truth;
* peak memory    -- of the whole process tree (this driver + Ray + every actor), sampled
                    every 0.25 s.

Vectors: a low-rank Gaussian mixture (1,024 centres in a 64-d latent space, mapped to
384-d, plus 384-d noise rows gathered from a fixed bank of 65,536, L2-normalised), seeded
per chunk; queries are fresh draws.
Stores go under --work (default benchmarks/results/tmp/knowledge_scale, not in git) and
are deleted after each size unless --keep. The machine is shared: compare ratios within
one run, and read the load average recorded in the JSON.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import RESULTS, SCRATCH, TreeSampler, offline_env, process_tree, write_result

DIM, LATENT, CENTRES, CHUNK, NOISE_ROWS = 384, 64, 1024, 250_000, 65_536
MiB = 2**20


class Synthetic:
    """Deterministic embedding-like vectors: row block b is always the same."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.w = rng.standard_normal((LATENT, DIM), dtype=np.float32) / np.sqrt(LATENT)
        self.centres = rng.standard_normal((CENTRES, LATENT), dtype=np.float32)
        # 384-d noise rows drawn once and gathered per vector: drawing 10M x 384 fresh
        # normals took ~50 s per million on this (loaded) machine
        self.noise = 0.05 * rng.standard_normal((NOISE_ROWS, DIM), dtype=np.float32)
        self.seed = seed

    def draw(self, n: int, key: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, key])
        z = self.centres[rng.integers(CENTRES, size=n)]
        z += 0.5 * rng.standard_normal((n, LATENT), dtype=np.float32)
        x = z @ self.w
        x += self.noise[rng.integers(NOISE_ROWS, size=n)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def chunks(self, n: int):
        for start in range(0, n, CHUNK):
            yield start, self.draw(min(CHUNK, n - start), 1 + start // CHUNK)


def passages(start: int, n: int) -> list[Any]:
    from fedrag_ray.data import Passage

    return [
        Passage(id=f"s{i}", text=f"synthetic passage {i}", doc_id=f"d{i}")
        for i in range(start, start + n)
    ]


def build_store(
    path: Path, n: int, data: Synthetic, queries: np.ndarray, kind: str, args: argparse.Namespace
) -> tuple[dict[str, Any], np.ndarray, float]:
    """Stream N vectors into a sharded store; exact top-10 of the queries on the way."""
    from fedrag_ray.knowledge_store import new_trained_index, write_store

    t0 = time.perf_counter()
    sample = data.draw(min(n, args.train_sample), 0)
    trained = new_trained_index(
        DIM, kind, sample, nlist=args.nlist, nprobe=args.nprobe[0], pq_m=args.pq_m
    )
    train_s = time.perf_counter() - t0
    best_s = np.full((len(queries), 10), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), 10), -1, dtype=np.int64)

    def chunks():
        nonlocal best_s, best_i
        for start, x in data.chunks(n):
            s = queries @ x.T
            top = np.argpartition(-s, 10, axis=1)[:, :10]
            cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
            cand_i = np.concatenate([best_i, top + start], axis=1)
            order = np.argsort(-cand_s, axis=1)[:, :10]
            best_s = np.take_along_axis(cand_s, order, 1)
            best_i = np.take_along_axis(cand_i, order, 1)
            yield passages(start, len(x)), x

    sizes = [len(a) for a in np.array_split(np.arange(n), args.shards)]
    params = {
        "index": kind,
        "nlist": args.nlist,
        "nprobe": args.nprobe[0],
        "hnsw_m": 32,
        "pq_m": args.pq_m,
    }
    manifest = write_store(path, trained, sizes, chunks(), params, {"synthetic": n})
    build_s = time.perf_counter() - t0
    return {**manifest, "train_s": train_s}, best_i, build_s


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(
        np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(found, exact, strict=True)])
    )


def timed_search(search: Any, queries: np.ndarray, batch: int) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    ids = np.concatenate(
        [search(queries[i : i + batch], 10)[1] for i in range(0, len(queries), batch)]
    )
    return ids, len(queries) / (time.perf_counter() - t)


def make_probe_class():
    import ray

    @ray.remote(num_cpus=0)
    class ClientProbe:
        """Stands in for a client actor's knowledge: served handle or local copy."""

        def __init__(self) -> None:
            import psutil

            from fedrag_ray import index_service  # noqa: F401 - the import cost is baseline
            from fedrag_ray.knowledge_store import KnowledgeStore  # noqa: F401

            self.proc = psutil.Process()
            self.store: Any = None

        def rss(self) -> int:
            return int(self.proc.memory_info().rss)

        def open(self, how: str, path: str) -> int:
            from fedrag_ray.index_service import ServedStore, service_name
            from fedrag_ray.knowledge_store import KnowledgeStore

            if how == "served":
                self.store = ServedStore.connect(service_name(path))
            else:
                import faiss

                faiss.omp_set_num_threads(1)
                self.store = KnowledgeStore.load(path)
            return self.rss()

        def search(self, queries: np.ndarray, batch: int = 16) -> tuple[int, float]:
            t = time.perf_counter()
            for i in range(0, len(queries), batch):
                self.store.search(queries[i : i + batch], 10)
                self.store.get(np.arange(i, i + 3)[None, :])  # fetch some passages too
            return self.rss(), len(queries) / (time.perf_counter() - t)

        def close(self) -> int:
            self.store = None
            import gc

            gc.collect()
            return self.rss()

    return ClientProbe


class LocalIndex:
    """The same FAISS shards in this process, searched as one (the qps baseline)."""

    def __init__(self, path: Path) -> None:
        import faiss

        from fedrag_ray.knowledge_store import read_manifest, read_shard

        manifest = read_manifest(path)
        self.shards = [read_shard(path, i, manifest) for i in range(manifest["shard_files"])]
        self.index = faiss.IndexShards(DIM, False, True)
        for shard in self.shards:
            self.index.add_shard(shard)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    def set_nprobe(self, nprobe: int) -> None:
        import faiss

        for shard in self.shards:
            faiss.try_extract_index_ivf(shard).nprobe = nprobe


def run_size(
    n: int, args: argparse.Namespace, data: Synthetic, queries: np.ndarray
) -> dict[str, Any]:
    import faiss
    import ray

    from fedrag_ray import index_service

    kind = "flat" if n <= args.flat_max else "ivfpq"
    path = Path(args.work) / f"store_{n}"
    print(f"[{n:,}] building {kind} store with {args.shards} shards ...", flush=True)
    manifest, exact, build_s = build_store(path, n, data, queries, kind, args)
    disk = sum(f.stat().st_size for f in path.iterdir())
    print(f"[{n:,}] built in {build_s:.0f}s ({disk / 2**30:.2f} GiB on disk)", flush=True)
    row: dict[str, Any] = {
        "n": n,
        "index": kind,
        "shards": args.shards,
        "params": {k: manifest[k] for k in ("nlist", "nprobe", "pq_m")},
        "build_s": build_s,
        "train_s": manifest["train_s"],
        "store_disk_bytes": disk,
    }

    faiss.omp_set_num_threads(1)
    local = LocalIndex(path)
    served, infos = index_service.start(path)
    try:
        Probe = make_probe_class()
        rows = []
        for nprobe in args.nprobe if kind != "flat" else [None]:
            if nprobe is not None:
                local.set_nprobe(nprobe)
                ray.get([h.set_nprobe.remote(nprobe) for h in served.handles])
            local_ids, local_qps = timed_search(local.search, queries, 16)
            served_ids, served_qps = timed_search(served.search, queries, 16)
            rows.append(
                {
                    "nprobe": nprobe,
                    "local_qps": local_qps,
                    "served_qps": served_qps,
                    "served_over_local": served_qps / local_qps,
                    "local_recall@10": recall(local_ids, exact),
                    "served_recall@10": recall(served_ids, exact),
                    "served_equals_local_ids": bool(np.array_equal(local_ids, served_ids)),
                }
            )
            print(f"[{n:,}] {rows[-1]}", flush=True)
        row["search"] = rows
        row["shard_actor_rss_bytes"] = [
            int(process_tree(i["pid"])[0].memory_info().rss) for i in infos
        ]
        del local

        # K client actors on the served index
        probes = [Probe.remote() for _ in range(args.clients)]
        before = ray.get([p.rss.remote() for p in probes])
        ray.get([p.open.remote("served", str(path)) for p in probes])
        after = ray.get([p.search.remote(queries) for p in probes])
        row["served_clients"] = {
            "k": args.clients,
            "rss_before_bytes": before,
            "rss_after_bytes": [a for a, _ in after],
            "added_bytes": [a - b for (a, _), b in zip(after, before, strict=True)],
            "aggregate_qps": float(sum(q for _, q in after)),
        }
        for p in probes:
            ray.kill(p)
        print(
            f"[{n:,}] served clients added MiB: "
            f"{[round(x / MiB, 1) for x in row['served_clients']['added_bytes']]}",
            flush=True,
        )

        # the local-copy baseline (today's serve: local), one actor
        if n <= args.local_copy_max:
            probe = Probe.remote()
            before = ray.get(probe.rss.remote())
            opened = ray.get(probe.open.remote("local", str(path)))
            after, qps = ray.get(probe.search.remote(queries))
            ray.kill(probe)
            row["local_copy_client"] = {
                "measured_actors": 1,
                "added_bytes": after - before,
                "open_added_bytes": opened - before,
                "qps": qps,
                "projected_k_actors_bytes": args.clients * (after - before),
                "projected": True,
            }
            print(f"[{n:,}] local copy in one actor: +{(after - before) / MiB:.0f} MiB", flush=True)
        else:
            row["local_copy_client"] = {
                "measured_actors": 0,
                "why_not": "KnowledgeStore.load holds every vector as float32 "
                f"({n * DIM * 4 / 2**30:.1f} GiB) plus the index and passage objects: "
                "more than this 24 GiB machine has for one actor",
                "projected_min_bytes_per_actor": n * DIM * 4,
            }
    finally:
        index_service.stop(served)
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    return row


def plot(rows: list[dict[str, Any]], out: Path) -> Path:
    from harness.plots import figure, save

    fig, (a, b) = figure(2, size=(11, 4))
    labels = [f"{r['n'] / 1e6:g}M {r['index']}" for r in rows]
    x = np.arange(len(rows))
    served = [np.mean(r["served_clients"]["added_bytes"]) / MiB for r in rows]
    local = [r["local_copy_client"].get("added_bytes", np.nan) / MiB for r in rows]
    a.bar(x - 0.2, local, 0.4, label="local copy (1 actor measured)")
    a.bar(x + 0.2, served, 0.4, label="served shards (mean of K actors)")
    a.set_xticks(x, labels)
    a.set_yscale("symlog")
    a.set_ylabel("MiB added per client actor")
    a.legend()
    for r, lbl in zip(rows, labels, strict=True):
        for s in r["search"]:
            tag = f"{lbl}" + (f" nprobe {s['nprobe']}" if s["nprobe"] else "")
            b.scatter(s["local_recall@10"], s["local_qps"], marker="o", label=f"local {tag}")
            b.scatter(s["served_recall@10"], s["served_qps"], marker="x", label=f"served {tag}")
    b.set_xlabel("recall@10 vs exact")
    b.set_ylabel("queries/s (k=10, batches of 16)")
    b.set_yscale("log")
    b.legend(fontsize=7)
    fig.suptitle("knowledge_scale: served shard actors vs local index")
    return save(fig, out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--queries", type=int, default=128)
    ap.add_argument("--flat-max", type=int, default=2_000_000, help="larger N: ivfpq")
    ap.add_argument("--local-copy-max", type=int, default=2_000_000)
    ap.add_argument("--nlist", type=int, default=256)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--pq-m", type=int, default=48)
    ap.add_argument("--train-sample", type=int, default=20_000)
    ap.add_argument("--work", default=str(SCRATCH / "knowledge_scale"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--name", default="knowledge_scale")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    offline_env()
    import ray

    Path(args.work).mkdir(parents=True, exist_ok=True)
    data = Synthetic(0)
    queries = data.draw(args.queries, 10**6)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)
    rows = []
    t0 = time.perf_counter()
    # RSS of this process's tree (driver, Ray, every actor) every 0.25 s
    with TreeSampler(interval=0.25, pss_every=0) as peak:
        for n in args.sizes:
            rows.append(run_size(n, args, data, queries))
            rows[-1]["process_tree_peak_bytes_so_far"] = peak.peak_rss
    ray.shutdown()
    served = [np.mean(r["served_clients"]["added_bytes"]) for r in rows]
    summary = {
        "served_client_added_mib": [s / MiB for s in served],
        "served_client_growth_mib_first_to_last": (served[-1] - served[0]) / MiB,
        "target_growth_mib": 100,
        "min_served_over_local_qps": min(s["served_over_local"] for r in rows for s in r["search"]),
        "target_served_over_local_qps": 0.5,
        "process_tree_peak_bytes": peak.peak_rss,
        "total_s": time.perf_counter() - t0,
    }
    args_doc = {k: v for k, v in vars(args).items()}
    path = write_result(args.name, {"args": args_doc, "rows": rows, "summary": summary}, args.out)
    png = plot(rows, args.out / f"{args.name}.png")
    print(f"wrote {path} and {png}; summary {summary}")


if __name__ == "__main__":
    main()
