"""FAISS knowledge store: sharded = single exact search, approximate indexes keep recall,
save/load round trips, atomic overwrite, and clear errors for corrupt directories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrag_ray.data import Passage
from fedrag_ray.knowledge_store import (
    FORMAT_VERSION,
    MANIFEST,
    KnowledgeStore,
    KnowledgeStoreError,
    faiss_gpu_count,
)

DIM = 32


def _normalize(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _random(n: int, seed: int) -> np.ndarray:
    return _normalize(np.random.default_rng(seed).standard_normal((n, DIM)))


def _clustered(n: int, seed: int, n_centers: int = 40) -> np.ndarray:
    """Embedding-like data: points scattered around topic centres."""
    rng = np.random.default_rng(seed)
    centers = _normalize(np.random.default_rng(1234).standard_normal((n_centers, DIM)))
    return _normalize(
        centers[rng.integers(n_centers, size=n)] + 0.15 * rng.standard_normal((n, DIM))
    )


def _passages(n: int) -> list[Passage]:
    return [
        Passage(id=f"p{i}", text=f"passage {i}", doc_id=f"d{i // 3}", metadata={"i": i})
        for i in range(n)
    ]


def _store(vectors: np.ndarray, **kw) -> KnowledgeStore:
    store = KnowledgeStore(DIM, **kw)
    store.add(_passages(len(vectors)), vectors)
    store.build()
    return store


def _recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(
        np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact, strict=True)])
    )


@pytest.fixture(scope="module")
def vectors():
    return _random(1500, seed=0), _random(40, seed=1)


@pytest.mark.parametrize("n_shards", [3, 4])
def test_sharded_flat_equals_single_flat(vectors, n_shards):
    data, queries = vectors
    s_single, i_single = _store(data).search(queries, 10)
    sharded = _store(data, n_shards=n_shards)
    assert len(sharded._shards) == n_shards
    assert sum(s.ntotal for s in sharded._shards) == len(data)
    s_sharded, i_sharded = sharded.search(queries, 10)
    np.testing.assert_array_equal(i_sharded, i_single)
    np.testing.assert_allclose(s_sharded, s_single, atol=1e-6)
    # and both agree with brute force in NumPy
    brute = np.argsort(-(queries @ data.T), axis=1)[:, :10]
    np.testing.assert_array_equal(i_single, brute)


def test_search_clips_k_and_get_returns_passages():
    data = _random(5, seed=2)
    store = _store(data, n_shards=2)
    scores, idx = store.search(data[:2], 10)
    assert idx.shape == (2, 5)
    assert idx[0, 0] == 0 and idx[1, 0] == 1
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    got = store.get(idx)
    assert [p.id for p in got[0]][0] == "p0" and len(got[1]) == 5
    assert store.get(np.array([[3, -1, -1]]))[0] == [store.passages[3]]


@pytest.mark.parametrize(
    ("kw", "threshold"),
    [
        ({"index": "ivf"}, 0.9),
        ({"index": "ivf", "n_shards": 2}, 0.9),
        ({"index": "hnsw"}, 0.95),
        ({"index": "hnsw", "n_shards": 3}, 0.95),
    ],
)
def test_approximate_recall_at_10(kw, threshold):
    data, queries = _clustered(3000, seed=3), _clustered(60, seed=4)
    _, exact = _store(data).search(queries, 10)
    _, approx = _store(data, **kw).search(queries, 10)
    assert _recall(approx, exact) >= threshold


def test_ivf_nprobe_is_honoured(vectors):
    data, queries = vectors  # uniform random data: the hard case for IVF
    _, exact = _store(data).search(queries, 10)
    store = _store(data, index="ivf", nlist=16, nprobe=1)
    assert store._index.nlist == 16 and store._index.nprobe == 1
    low = _recall(store.search(queries, 10)[1], exact)
    full = _recall(_store(data, index="ivf", nlist=16, nprobe=16).search(queries, 10)[1], exact)
    assert full == pytest.approx(1.0)
    assert low < full


def test_empty_store_and_shape_errors():
    store = KnowledgeStore(DIM)
    with pytest.raises(KnowledgeStoreError, match="empty"):
        store.search(_random(1, 0), 3)
    with pytest.raises(ValueError, match="does not match"):
        store.add(_passages(3), _random(2, 0))
    with pytest.raises(ValueError, match="flat, ivf, ivfpq, hnsw"):
        KnowledgeStore(DIM, index="lsh")


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize(
    "kw", [{"n_shards": 3}, {"index": "ivf", "nlist": 8, "nprobe": 2}, {"index": "hnsw"}]
)
def test_save_load_identical_search(tmp_path, vectors, kw):
    data, queries = vectors
    store = _store(data, **kw)
    before = store.search(queries, 10)
    store.save(tmp_path / "ks")
    loaded = KnowledgeStore.load(tmp_path / "ks", expected_dim=DIM)
    after = loaded.search(queries, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    assert loaded.passages == store.passages
    np.testing.assert_array_equal(loaded.embeddings, store.embeddings)
    assert (loaded.index_type, loaded.n_shards) == (store.index_type, store.n_shards)
    manifest = json.loads((tmp_path / "ks" / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["count"] == len(data)


def test_save_over_existing_store_replaces_it(tmp_path):
    target = tmp_path / "ks"
    first = _store(_random(30, seed=5), n_shards=3)
    first.save(target)
    second = KnowledgeStore(DIM)
    second.add(_passages(12)[::-1], _random(12, seed=6))
    second.save(target)
    loaded = KnowledgeStore.load(target)
    assert len(loaded) == 12 and loaded.passages[0].id == "p11"
    assert sorted(f.name for f in target.iterdir()) == [
        "embeddings.npy",
        MANIFEST,
        "passages_0.jsonl",
        "shard_0.faiss",
    ]  # no stale shard_1/shard_2 from the 3-shard store
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ks"]  # no tmp or .old left over


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ks"
    _store(_random(20, seed=7), n_shards=2).save(path)
    return path


def test_corrupt_missing_shard(saved):
    (saved / "shard_1.faiss").unlink()
    with pytest.raises(KnowledgeStoreError, match="corrupt knowledge store.*shard_1"):
        KnowledgeStore.load(saved)


def test_corrupt_truncated_shard(saved):
    shard = saved / "shard_0.faiss"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(KnowledgeStoreError, match="corrupt knowledge store"):
        KnowledgeStore.load(saved)


def test_corrupt_truncated_passages_mid_line(saved):
    text = (saved / "passages_1.jsonl").read_text()
    (saved / "passages_1.jsonl").write_text(text[: len(text) // 2])
    with pytest.raises(KnowledgeStoreError, match="corrupt knowledge store"):
        KnowledgeStore.load(saved)


def test_corrupt_passages_missing_lines(saved):
    lines = (saved / "passages_1.jsonl").read_text().splitlines(keepends=True)
    (saved / "passages_1.jsonl").write_text("".join(lines[:-3]))
    with pytest.raises(KnowledgeStoreError, match="manifest says 20 passages, found 17"):
        KnowledgeStore.load(saved)


def test_corrupt_embeddings(saved):
    emb = saved / "embeddings.npy"
    emb.write_bytes(emb.read_bytes()[:100])
    with pytest.raises(KnowledgeStoreError, match="corrupt knowledge store"):
        KnowledgeStore.load(saved)


def test_manifest_format_version_mismatch(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["format_version"] = FORMAT_VERSION + 98
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        KnowledgeStoreError, match=rf"format version {FORMAT_VERSION + 98}.*rebuild"
    ):
        KnowledgeStore.load(saved)


def test_manifest_corrupt_or_missing(saved, tmp_path):
    (saved / MANIFEST).write_text('{"format_version": 1,')
    with pytest.raises(KnowledgeStoreError, match="corrupt manifest"):
        KnowledgeStore.load(saved)
    with pytest.raises(KnowledgeStoreError, match="not a knowledge store"):
        KnowledgeStore.load(tmp_path / "nowhere")


@pytest.mark.parametrize("key", ["dim", "index", "count", "shard_files"])
def test_manifest_missing_key(saved, key):
    manifest = json.loads((saved / MANIFEST).read_text())
    del manifest[key]
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KnowledgeStoreError, match=key):
        KnowledgeStore.load(saved, expected_dim=DIM)


def test_expected_dim_mismatch(saved):
    with pytest.raises(KnowledgeStoreError, match=rf"dim {DIM} but the retriever produces 384"):
        KnowledgeStore.load(saved, expected_dim=384)
    assert len(KnowledgeStore.load(saved, expected_dim=DIM)) == 20


# --------------------------------------------------------------------------- GPU


@pytest.mark.skipif(faiss_gpu_count() > 0, reason="checks the no-GPU error path")
def test_gpu_device_without_gpu_is_a_clear_error(saved):
    with pytest.raises(KnowledgeStoreError, match="device is 'gpu' but FAISS sees no GPU"):
        KnowledgeStore(DIM, device="gpu")
    with pytest.raises(KnowledgeStoreError, match="no GPU"):
        KnowledgeStore.load(saved, device="gpu")


@pytest.mark.skipif(faiss_gpu_count() == 0, reason="needs CUDA + faiss-gpu")
def test_gpu_search_matches_cpu(tmp_path, vectors):
    data, queries = vectors
    cpu = _store(data, n_shards=2).search(queries, 10)
    gpu_store = _store(data, n_shards=2, device="gpu")
    gpu = gpu_store.search(queries, 10)
    np.testing.assert_array_equal(gpu[1][:, :5], cpu[1][:, :5])
    np.testing.assert_allclose(gpu[0], cpu[0], atol=1e-4)
    gpu_store.save(tmp_path / "ks")
    loaded = KnowledgeStore.load(tmp_path / "ks", device="gpu")
    np.testing.assert_array_equal(loaded.search(queries, 10)[1][:, :5], cpu[1][:, :5])


# --------------------------------------------------------------------------- at scale


def test_add_in_chunks_is_linear_and_equals_one_add():
    """Chunks are kept and joined once (no re-concatenation per add): same vectors."""
    data = _random(1000, seed=8)
    chunked = KnowledgeStore(DIM)
    for i in range(0, 1000, 37):
        chunked.add(_passages(1000)[i : i + 37], data[i : i + 37])
    assert len(chunked._chunks) == 28 and len(chunked._embeddings) == 0
    np.testing.assert_array_equal(chunked.embeddings, data)
    assert chunked._chunks == []


@pytest.mark.parametrize("index", ["ivf", "ivfpq"])
def test_sharded_approximate_equals_single(index):
    """Trained once, one copy per shard: searching the shards is the same search."""
    data, queries = _clustered(3000, seed=9), _clustered(30, seed=10)
    kw = {"index": index, "nlist": 16, "nprobe": 4, "pq_m": 8}
    single = _store(data, **kw).search(queries, 10)
    sharded = _store(data, n_shards=3, **kw).search(queries, 10)
    np.testing.assert_array_equal(sharded[1], single[1])
    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5)


def test_ivfpq_recall_compressed_and_pq_m_must_divide_dim(tmp_path):
    data, queries = _clustered(4000, seed=11), _clustered(60, seed=12)
    _, exact = _store(data).search(queries, 10)
    store = _store(data, index="ivfpq", nlist=16, nprobe=16, pq_m=16)
    assert _recall(store.search(queries, 10)[1], exact) >= 0.5
    store.save(tmp_path / "pq")
    assert store._index.code_size == 16  # bytes per passage, instead of 4 x 32
    assert (tmp_path / "pq" / "shard_0.faiss").stat().st_size < data.nbytes / 2
    with pytest.raises(ValueError, match=r"knowledge_store.pq_m \(5\) must divide"):
        KnowledgeStore(DIM, index="ivfpq", pq_m=5)
