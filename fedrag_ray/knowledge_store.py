"""FAISS knowledge store: passages + their embeddings, exact or approximate, sharded,
saved atomically in a versioned directory format, on CPU or GPU.

Embeddings are L2-normalised float32 and searched by inner product (= cosine). The store
keeps its own copy of the vectors so LSR can score retrieved passages against a query
encoder that has a gradient, without re-embedding the passages.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

from fedrag_ray.atomic import atomic_directory
from fedrag_ray.data import Passage

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_MANIFEST_KEYS = ("dim", "count", "index", "n_shards", "shard_files", "nlist", "nprobe", "hnsw_m")


class KnowledgeStoreError(RuntimeError):
    """A store directory that is missing, corrupt, or does not match what was expected."""


class KnowledgeStore:
    def __init__(
        self,
        dim: int,
        index: str = "flat",
        n_shards: int = 1,
        nlist: int = 64,
        nprobe: int = 8,
        hnsw_m: int = 32,
        device: str = "cpu",
    ) -> None:
        if index not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"index must be one of flat, ivf, hnsw; got {index!r}")
        if device == "gpu" and faiss_gpu_count() == 0:
            raise KnowledgeStoreError(
                "knowledge_store.device is 'gpu' but FAISS sees no GPU (install faiss-gpu "
                "and run on a CUDA machine, or set knowledge_store.device: cpu)"
            )
        self.dim = dim
        self.index_type = index
        self.n_shards = n_shards
        self.nlist = nlist
        self.nprobe = nprobe
        self.hnsw_m = hnsw_m
        self.device = device
        self.passages: list[Passage] = []
        self.embeddings = np.zeros((0, dim), dtype=np.float32)
        self._index: faiss.Index | None = None
        self._shards: list[faiss.Index] = []  # keeps sub-indexes alive under IndexShards

    # ------------------------------------------------------------------ building

    def __len__(self) -> int:
        return len(self.passages)

    def add(self, passages: list[Passage], embeddings: np.ndarray) -> None:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(passages), self.dim):
            raise ValueError(
                f"embeddings shape {embeddings.shape} does not match ({len(passages)}, {self.dim})"
            )
        self.passages.extend(passages)
        self.embeddings = np.concatenate([self.embeddings, embeddings])
        self._index = None  # rebuilt lazily; IVF needs all vectors to train

    def _new_index(self, vectors: np.ndarray) -> faiss.Index:
        if self.index_type == "flat":
            index = faiss.IndexFlatIP(self.dim)
        elif self.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            nlist = max(1, min(self.nlist, len(vectors) // 39 or 1))
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = min(self.nprobe, nlist)
        index.add(vectors)
        return index

    def build(self) -> faiss.Index:
        """(Re)build the FAISS index from the stored vectors."""
        if not len(self):
            raise KnowledgeStoreError("cannot search an empty knowledge store")
        chunks = np.array_split(self.embeddings, min(self.n_shards, len(self)))
        return self._assemble([self._new_index(chunk) for chunk in chunks])

    def _assemble(self, shards: list[faiss.Index]) -> faiss.Index:
        self._shards = shards
        if len(shards) == 1:
            index = shards[0]
        else:
            # threaded=False: on few cores the threaded fan-out is several times slower;
            # successive_ids=True: shard i's ids follow shard i-1's, as in one index.
            index = faiss.IndexShards(self.dim, False, True)
            for shard in shards:
                index.add_shard(shard)
        if self.device == "gpu":
            index = faiss.index_cpu_to_all_gpus(index)
        self._index = index
        return index

    # ------------------------------------------------------------------ search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, passage indices) per query; -1 marks a missing hit."""
        index = self._index if self._index is not None else self.build()
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = min(k, len(self))
        scores, idx = index.search(queries, k)
        return scores, idx

    def get(self, indices: np.ndarray) -> list[list[Passage]]:
        return [[self.passages[i] for i in row if i >= 0] for row in np.atleast_2d(indices)]

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash mid-save leaves the previous store intact."""
        if self._index is None:
            self.build()
        with atomic_directory(path) as tmp:
            for i, shard in enumerate(self._shards):  # IndexShards itself is not serialisable
                faiss.write_index(shard, str(tmp / f"shard_{i}.faiss"))
            np.save(tmp / "embeddings.npy", self.embeddings)
            with open(tmp / "passages.jsonl", "w") as f:
                for p in self.passages:
                    f.write(json.dumps(asdict(p)) + "\n")
            manifest = {
                "format_version": FORMAT_VERSION,
                "dim": self.dim,
                "count": len(self),
                "index": self.index_type,
                "n_shards": self.n_shards,
                "shard_files": len(self._shards),
                "nlist": self.nlist,
                "nprobe": self.nprobe,
                "hnsw_m": self.hnsw_m,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

    @classmethod
    def load(
        cls, path: str | Path, expected_dim: int | None = None, device: str = "cpu"
    ) -> KnowledgeStore:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise KnowledgeStoreError(f"{path}: not a knowledge store (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise KnowledgeStoreError(f"{manifest_path}: corrupt manifest ({err})") from None
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise KnowledgeStoreError(
                f"{path}: store format version {version}, this fedrag_ray reads "
                f"{FORMAT_VERSION}; rebuild it with `fedrag-ray index build`"
            )
        missing = [k for k in _MANIFEST_KEYS if k not in manifest]
        if missing:
            raise KnowledgeStoreError(f"{manifest_path}: corrupt manifest (missing {missing})")
        if expected_dim is not None and manifest["dim"] != expected_dim:
            raise KnowledgeStoreError(
                f"{path}: store embeddings have dim {manifest['dim']} but the retriever "
                f"produces {expected_dim}; rebuild the index with this retriever"
            )
        store = cls(
            manifest["dim"],
            manifest["index"],
            manifest["n_shards"],
            manifest["nlist"],
            manifest["nprobe"],
            manifest["hnsw_m"],
            device,
        )
        try:
            with open(path / "passages.jsonl") as f:
                store.passages = [Passage(**json.loads(line)) for line in f if line.strip()]
            store.embeddings = np.load(path / "embeddings.npy")
            shards = [
                faiss.read_index(str(path / f"shard_{i}.faiss"))
                for i in range(manifest["shard_files"])
            ]
        except (OSError, ValueError, TypeError, RuntimeError, KeyError) as err:
            raise KnowledgeStoreError(f"{path}: corrupt knowledge store ({err})") from None
        count = manifest["count"]
        indexed = sum(s.ntotal for s in shards)
        if not (len(store.passages) == count == len(store.embeddings) == indexed):
            raise KnowledgeStoreError(
                f"{path}: corrupt knowledge store: manifest says {count} passages, found "
                f"{len(store.passages)} passages, {len(store.embeddings)} vectors, "
                f"{indexed} indexed"
            )
        store._assemble(shards)
        return store


def faiss_gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0
