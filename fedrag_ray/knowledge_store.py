"""FAISS knowledge store: passages + their embeddings, exact or approximate, sharded,
saved atomically in a versioned, content-addressed directory format, on CPU or GPU.

Embeddings are L2-normalised float32 and searched by inner product (= cosine). The store
keeps its own copy of the vectors so LSR can score retrieved passages against a query
encoder that has a gradient, without re-embedding the passages.

Approximate indexes (``ivf``, ``ivfpq``) are trained **once**, on a seeded sample of all
vectors, and every shard is a copy of that trained index holding its own id range: the
shards share one coarse quantizer (and PQ codebooks), so searching them and merging is
the same search as one index over everything. A directory holds one ``shard_i.faiss``
and one ``passages_i.jsonl`` per shard, so a shard can be served on its own
(``index_service``); ``provenance`` in the manifest says what the store was built from
(``provenance.py``), so a stale store is refused instead of silently reused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from fedrag_ray.atomic import atomic_directory
from fedrag_ray.data import Passage

if TYPE_CHECKING:
    from fedrag_ray.config import KnowledgeStoreConfig

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
INDEX_TYPES = ("flat", "ivf", "ivfpq", "hnsw")
TRAIN_SAMPLE = 100_000  # vectors an IVF / PQ index is trained on (seeded sample)
_MANIFEST_KEYS = (
    "dim",
    "count",
    "index",
    "n_shards",
    "shard_files",
    "shard_sizes",
    "nlist",
    "nprobe",
    "hnsw_m",
    "pq_m",
    "has_vectors",
)


class KnowledgeStoreError(RuntimeError):
    """A store directory that is missing, corrupt, or does not match what was expected."""


def shard_file(i: int) -> str:
    return f"shard_{i}.faiss"


def passages_file(i: int) -> str:
    return f"passages_{i}.jsonl"


def passage_line(p: Passage) -> str:
    # the fields spelled out: dataclasses.asdict deep-copies, ~3x slower at 10M lines
    return (
        json.dumps({"id": p.id, "text": p.text, "doc_id": p.doc_id, "metadata": p.metadata}) + "\n"
    )


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The checked manifest of the store at ``path`` (raises KnowledgeStoreError)."""
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
    return manifest


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
        pq_m: int = 48,
    ) -> None:
        if index not in INDEX_TYPES:
            raise ValueError(f"index must be one of {', '.join(INDEX_TYPES)}; got {index!r}")
        if index == "ivfpq" and dim % pq_m:
            raise ValueError(f"knowledge_store.pq_m ({pq_m}) must divide the embedding dim ({dim})")
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
        self.pq_m = pq_m
        self.device = device
        self.passages: list[Passage] = []
        self.provenance: dict[str, Any] = {}
        self._chunks: list[np.ndarray] = []  # added vectors, joined once when needed
        self._embeddings = np.zeros((0, dim), dtype=np.float32)
        self._index: faiss.Index | None = None
        self._shards: list[faiss.Index] = []  # keeps sub-indexes alive under IndexShards

    @classmethod
    def from_config(cls, dim: int, ks: KnowledgeStoreConfig) -> KnowledgeStore:
        return cls(dim, ks.index, ks.n_shards, ks.nlist, ks.nprobe, ks.hnsw_m, ks.device, ks.pq_m)

    # ------------------------------------------------------------------ building

    def __len__(self) -> int:
        return len(self.passages)

    @property
    def embeddings(self) -> np.ndarray:
        """All vectors, (n, dim) float32. Chunks from :meth:`add` are joined here, once:
        adding n vectors in chunks costs O(n), not O(n^2) re-concatenations."""
        if self._chunks:
            self._embeddings = np.concatenate([self._embeddings, *self._chunks])
            self._chunks = []
        return self._embeddings

    @embeddings.setter
    def embeddings(self, value: np.ndarray) -> None:
        self._embeddings = value
        self._chunks = []

    def add(self, passages: list[Passage], embeddings: np.ndarray) -> None:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(passages), self.dim):
            raise ValueError(
                f"embeddings shape {embeddings.shape} does not match ({len(passages)}, {self.dim})"
            )
        self.passages.extend(passages)
        self._chunks.append(embeddings)
        self._index = None  # rebuilt lazily; IVF needs all vectors to train
        self.provenance = {}  # no longer what it was built from: whoever adds, records

    def vectors(self, indices: np.ndarray) -> np.ndarray:
        """The stored vectors of passage ``indices`` (any shape; -1 gives row 0)."""
        idx = np.asarray(indices)
        return self.embeddings[np.where(idx >= 0, idx, 0)]

    def trained_index(self, sample: np.ndarray) -> faiss.Index:
        """An empty index of this store's type, trained on ``sample`` when it needs it."""
        return new_trained_index(
            self.dim, self.index_type, sample, self.nlist, self.nprobe, self.hnsw_m, self.pq_m
        )

    def build(self) -> faiss.Index:
        """(Re)build the FAISS index from the stored vectors: train once, then one copy
        of the trained index per shard, each holding its contiguous id range."""
        if not len(self):
            raise KnowledgeStoreError("cannot search an empty knowledge store")
        vectors = self.embeddings
        trained = self.trained_index(train_sample(vectors))
        shards = []
        for chunk in np.array_split(vectors, min(self.n_shards, len(self))):
            shard = faiss.clone_index(trained)
            shard.add(chunk)
            shards.append(shard)
        return self._assemble(shards)

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

    def manifest(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "dim": self.dim,
            "count": len(self),
            "index": self.index_type,
            "n_shards": self.n_shards,
            "shard_files": len(self._shards),
            "shard_sizes": [int(s.ntotal) for s in self._shards],
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "hnsw_m": self.hnsw_m,
            "pq_m": self.pq_m,
            "has_vectors": True,
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> None:
        """Write atomically: a crash mid-save leaves the previous store intact."""
        if self._index is None:
            self.build()
        with atomic_directory(path) as tmp:
            start = 0
            for i, shard in enumerate(self._shards):  # IndexShards itself is not serialisable
                faiss.write_index(shard, str(tmp / shard_file(i)))
                with open(tmp / passages_file(i), "w") as f:
                    f.writelines(
                        passage_line(p) for p in self.passages[start : start + shard.ntotal]
                    )
                start += shard.ntotal
            np.save(tmp / "embeddings.npy", self.embeddings)
            (tmp / MANIFEST).write_text(json.dumps(self.manifest(), indent=2))

    @classmethod
    def load(
        cls, path: str | Path, expected_dim: int | None = None, device: str = "cpu"
    ) -> KnowledgeStore:
        path = Path(path)
        manifest = read_manifest(path)
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
            manifest["pq_m"],
        )
        store.provenance = manifest.get("provenance") or {}
        try:
            for i in range(manifest["shard_files"]):
                with open(path / passages_file(i)) as f:
                    store.passages.extend(Passage(**json.loads(line)) for line in f if line.strip())
            shards = [read_shard(path, i, manifest) for i in range(manifest["shard_files"])]
            if manifest["has_vectors"]:
                store.embeddings = np.load(path / "embeddings.npy")
            else:
                store.embeddings = _reconstruct_all(shards, manifest["dim"])
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


def read_shard(path: Path, i: int, manifest: dict[str, Any]) -> faiss.Index:
    """Shard ``i`` of the store at ``path``, with the manifest's search parameters."""
    index = faiss.read_index(str(path / shard_file(i)))
    if index.ntotal != manifest["shard_sizes"][i]:
        raise ValueError(
            f"{shard_file(i)} holds {index.ntotal} vectors, manifest says "
            f"{manifest['shard_sizes'][i]}"
        )
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(manifest["nprobe"], ivf.nlist)
    return index


def _reconstruct_all(shards: list[faiss.Index], dim: int) -> np.ndarray:
    parts = []
    for shard in shards:
        ivf = faiss.try_extract_index_ivf(shard)
        if ivf is not None:
            ivf.make_direct_map()
        parts.append(shard.reconstruct_n(0, shard.ntotal))
    return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)


def train_sample(vectors: np.ndarray, size: int = TRAIN_SAMPLE, seed: int = 0) -> np.ndarray:
    """A seeded sample of ``vectors`` to train an approximate index on (all if fewer)."""
    if len(vectors) <= size:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
    return np.ascontiguousarray(vectors[rows])


def new_trained_index(
    dim: int,
    kind: str,
    sample: np.ndarray,
    nlist: int = 64,
    nprobe: int = 8,
    hnsw_m: int = 32,
    pq_m: int = 48,
) -> faiss.Index:
    """An empty FAISS index of ``kind`` (inner product), trained on ``sample`` if needed.

    ``nlist`` is capped so every list gets ~39 training points (FAISS warns below that);
    ``ivfpq`` stores ``pq_m`` bytes per vector (8-bit codes) instead of 4 x dim."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        return faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    nlist = max(1, min(nlist, len(sample) // 39 or 1))
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    elif kind == "ivfpq":
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"index must be one of {', '.join(INDEX_TYPES)}; got {kind!r}")
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.nprobe = min(nprobe, nlist)
    return index


def write_store(
    path: str | Path,
    trained: faiss.Index,
    shard_sizes: list[int],
    chunks: Iterable[tuple[list[Passage], np.ndarray]],
    params: dict[str, Any],
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stream a store to disk without holding its vectors: ``chunks`` of (passages,
    vectors) in id order are added to copies of ``trained`` (one per shard, sizes given
    up front) and passage lines written as they come. No ``embeddings.npy`` is kept;
    the index's own (for PQ: approximate) reconstruction stands in for it. Linear in the
    corpus, with memory of one chunk plus the indexes. Returns the manifest."""
    sizes = [int(s) for s in shard_sizes]
    bounds = np.cumsum([0, *sizes])
    with atomic_directory(path) as tmp:
        shard_i, shard = 0, faiss.clone_index(trained)
        out = open(tmp / passages_file(0), "w")  # noqa: SIM115 - closed per shard below
        written = 0
        try:
            for passages, vectors in chunks:
                vectors = np.ascontiguousarray(vectors, dtype=np.float32)
                pos = 0
                while pos < len(vectors):
                    take = min(len(vectors) - pos, int(bounds[shard_i + 1] - written))
                    shard.add(vectors[pos : pos + take])
                    out.writelines(passage_line(p) for p in passages[pos : pos + take])
                    pos += take
                    written += take
                    if written == bounds[shard_i + 1] and shard_i + 1 < len(sizes):
                        faiss.write_index(shard, str(tmp / shard_file(shard_i)))
                        out.close()
                        shard_i += 1
                        shard = faiss.clone_index(trained)
                        out = open(tmp / passages_file(shard_i), "w")  # noqa: SIM115
            if written != bounds[-1]:
                raise ValueError(f"write_store: got {written} vectors, expected {bounds[-1]}")
            faiss.write_index(shard, str(tmp / shard_file(shard_i)))
        finally:
            out.close()
        manifest = {
            "format_version": FORMAT_VERSION,
            "dim": trained.d,
            "count": int(bounds[-1]),
            "n_shards": len(sizes),
            "shard_files": len(sizes),
            "shard_sizes": sizes,
            "has_vectors": False,
            "provenance": provenance or {},
            **params,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def faiss_gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0
