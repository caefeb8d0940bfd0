"""The global index served by Ray actors (``knowledge_store.serve: actors``).

Each shard of a saved store (``shard_i.faiss`` + ``passages_i.jsonl``) is loaded by one
:class:`ShardActor`, placed round-robin over the cluster's alive nodes. Whoever searches
(client actors, the server's evaluation, ``ask``) holds a :class:`ServedStore`: a few
actor handles that send query vectors to every shard, merge the per-shard top-k by score
(:func:`merge_top_k`) and fetch passages and vectors by global id. A client actor then
holds no part of the corpus: its memory no longer grows with it.

Shard actors are found by name (:func:`service_name`, derived from the store's path and
the owning run's id) in fedrag_ray's own Ray namespace (:data:`ACTOR_NAMESPACE`), so a
client actor needs only the config and its run's id to connect, and two runs serving the
same store at once (concurrent Tune trials sharing ``knowledge_store.path``, a run beside
``ask``) each have their own actors instead of colliding on one name. They are owned by
the driver that started them and stopped by it (:func:`stop`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray

from fedrag_ray.data import Passage
from fedrag_ray.fusion import merge_top_k
from fedrag_ray.knowledge_store import passages_file, read_manifest, read_shard

ACTOR_PREFIX = "fedrag-index"
ACTOR_NAMESPACE = "fedrag_ray"  # not the job's namespace: names of ours, nobody else's


def service_name(store_path: str | Path, run_id: str = "") -> str:
    """The Ray actor-name prefix of ``run_id``'s service for the store at ``store_path``
    (no ``run_id``: the one-off service of ``ask`` / a benchmark)."""
    digest = hashlib.sha1(str(Path(store_path).resolve()).encode()).hexdigest()[:12]
    return f"{ACTOR_PREFIX}-{digest}" + (f"-{run_id}" if run_id else "")


class PassageFile:
    """Passages of one JSONL file read by line offset: 8 bytes per passage in memory
    instead of a Python object (10M passages as objects would be several GiB)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        offsets, pos = [], 0
        with open(self.path, "rb") as f:
            for line in f:
                offsets.append(pos)
                pos += len(line)
        self.offsets = np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        out = []
        with open(self.path, "rb") as f:
            for r in rows:
                f.seek(int(self.offsets[r]))
                out.append(json.loads(f.readline()))
        return out


@ray.remote
class ShardActor:
    """One shard of a saved store: its FAISS index, its passages by offset and, when the
    store keeps them, a read-only memory map of its vectors (for LSR)."""

    def __init__(self, store_path: str, shard: int, threads: int = 1) -> None:
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        path = Path(store_path)
        manifest = read_manifest(path)
        self.shard = shard
        self.offset = int(sum(manifest["shard_sizes"][:shard]))
        self.index = read_shard(path, shard, manifest)
        self.passages = PassageFile(path / passages_file(shard))
        n = int(self.index.ntotal)
        if len(self.passages) != n:
            raise ValueError(
                f"{path}: {passages_file(shard)} has {len(self.passages)} lines, {n} indexed"
            )
        self.vectors_map = (
            np.load(path / "embeddings.npy", mmap_mode="r")[self.offset : self.offset + n]
            if manifest["has_vectors"]
            else None
        )
        self.layout = {
            "dim": int(manifest["dim"]),
            "shard_sizes": [int(x) for x in manifest["shard_sizes"]],
        }

    def info(self) -> dict[str, Any]:
        return {
            **self.layout,
            "shard": self.shard,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }

    def set_nprobe(self, nprobe: int) -> None:
        """IVF search breadth (a search setting: the index itself is unchanged)."""
        import faiss

        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = min(nprobe, ivf.nlist)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, np.where(idx >= 0, idx + self.offset, -1)

    def passages_at(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        return self.passages.read([int(i) - self.offset for i in ids])

    def vectors_at(self, ids: Sequence[int]) -> np.ndarray:
        rows = np.asarray(ids, dtype=np.int64) - self.offset
        if self.vectors_map is not None:
            return np.asarray(self.vectors_map[rows])
        import faiss

        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and ivf.direct_map.type == 0:  # NoMap
            ivf.make_direct_map()
        return np.stack([self.index.reconstruct(int(r)) for r in rows])


class ServedStore:
    """The search side of a :class:`~fedrag_ray.knowledge_store.KnowledgeStore`
    (``search``, ``get``, ``vectors``, ``len``, ``dim``) over shard actors."""

    def __init__(self, handles: list[Any], dim: int, shard_sizes: list[int]) -> None:
        self.handles = handles
        self.dim = dim
        self.shard_sizes = shard_sizes
        self.bounds = np.cumsum([0, *shard_sizes])

    @classmethod
    def connect(cls, name: str) -> ServedStore:
        """The running service ``name`` (started by :func:`start`)."""
        first = ray.get_actor(f"{name}/0", namespace=ACTOR_NAMESPACE)
        layout = ray.get(first.info.remote())
        n = len(layout["shard_sizes"])
        handles = [
            first,
            *(ray.get_actor(f"{name}/{i}", namespace=ACTOR_NAMESPACE) for i in range(1, n)),
        ]
        return cls(handles, layout["dim"], layout["shard_sizes"])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = min(k, len(self))
        ref = ray.put(queries)
        parts = ray.get([h.search.remote(ref, min(k, size)) for h, size in self._live()])
        return merge_top_k([s for s, _ in parts], [i for _, i in parts], k)

    def _live(self) -> list[tuple[Any, int]]:
        return [(h, s) for h, s in zip(self.handles, self.shard_sizes, strict=True) if s > 0]

    def _by_shard(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        shard_of = np.searchsorted(self.bounds, ids, side="right") - 1
        return {int(s): np.flatnonzero(shard_of == s) for s in np.unique(shard_of)}

    def get(self, indices: np.ndarray) -> list[list[Passage]]:
        rows = np.atleast_2d(indices)
        flat = np.unique(rows[rows >= 0])
        groups = self._by_shard(flat)
        futures = {
            s: self.handles[s].passages_at.remote(flat[pos].tolist()) for s, pos in groups.items()
        }
        by_id: dict[int, Passage] = {}
        for s, fut in futures.items():
            for pid, p in zip(flat[groups[s]].tolist(), ray.get(fut), strict=True):
                by_id[pid] = Passage(**p)
        return [[by_id[int(i)] for i in row if i >= 0] for row in rows]

    def vectors(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices)
        flat = np.where(idx >= 0, idx, 0).reshape(-1)
        out = np.zeros((len(flat), self.dim), dtype=np.float32)
        groups = self._by_shard(flat)
        futures = {
            s: self.handles[s].vectors_at.remote(flat[pos].tolist()) for s, pos in groups.items()
        }
        for s, fut in futures.items():
            out[groups[s]] = ray.get(fut)
        return out.reshape(*idx.shape, self.dim)


def alive_nodes() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources"))


def start(
    store_path: str | Path, num_cpus: float = 0.0, name: str | None = None
) -> tuple[ServedStore, list[dict[str, Any]]]:
    """Start one actor per shard of the store at ``store_path`` (Ray must be running),
    shard i on alive node i mod n, and wait until all have loaded. Returns the store
    handle and each actor's info (node, pid). ``name``: the service's name (default
    ``service_name(store_path)``; a federated run passes its own run id's)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path = Path(store_path)
    manifest = read_manifest(path)
    name = name or service_name(path)
    nodes = alive_nodes()
    handles = []
    for i in range(manifest["shard_files"]):
        handles.append(
            ShardActor.options(
                name=f"{name}/{i}",
                namespace=ACTOR_NAMESPACE,
                num_cpus=num_cpus,
                # hard: a soft affinity fell back to the head node when the target
                # node's CPUs were all held by client actors (zero-CPU actor or not)
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    nodes[i % len(nodes)], soft=False
                ),
            ).remote(str(path.resolve()), i, max(1, int(num_cpus)))
        )
    infos = ray.get([h.info.remote() for h in handles])
    return ServedStore(handles, int(manifest["dim"]), list(manifest["shard_sizes"])), infos


def stop(store: ServedStore) -> None:
    for h in store.handles:
        ray.kill(h)


@contextlib.contextmanager
def serving(store_path: str | Path, num_cpus: float = 0.0) -> Iterator[ServedStore]:
    """Serve the store for the duration of a block (``ask``), starting a local Ray if
    none is running, and stopping what was started here."""
    from fedrag_ray.federated.ray_head import start_or_join_ray

    started = start_or_join_ray(log_to_driver=False)
    store, _ = start(store_path, num_cpus)
    try:
        yield store
    finally:
        stop(store)
        if started:
            ray.shutdown()
