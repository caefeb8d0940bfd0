"""The served index: shard actors on a real (embedded) Ray give exactly the ids and
scores of one local flat index, fetch the right passages and vectors, and a streamed
compressed store loads in the shard actors like a saved one."""

from __future__ import annotations

import numpy as np
import pytest

from fedrag_ray.data import Passage
from fedrag_ray.knowledge_store import (
    KnowledgeStore,
    new_trained_index,
    read_manifest,
    write_store,
)

DIM = 32


def _vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _passages(n: int) -> list[Passage]:
    return [Passage(id=f"p{i}", text=f"passage {i}", doc_id=f"d{i // 2}") for i in range(n)]


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for the shard actors; one an earlier test of the session left running
    is used as it is (and left to its owner)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.timeout(300)
def test_served_exact_equals_local_flat(ray_local, tmp_path):
    from fedrag_ray import index_service

    data, queries = _vectors(2000, 0), _vectors(25, 1)
    passages = _passages(len(data))
    local = KnowledgeStore(DIM)
    local.add(passages, data)
    s_local, i_local = local.search(queries, 10)

    sharded = KnowledgeStore(DIM, n_shards=3)
    sharded.add(passages, data)
    sharded.save(tmp_path / "ks")
    served, infos = index_service.start(tmp_path / "ks")
    try:
        assert len(served) == len(data) and len(infos) == 3
        assert len({i["pid"] for i in infos}) == 3  # three actor processes
        s_served, i_served = served.search(queries, 10)
        np.testing.assert_array_equal(i_served, i_local)
        np.testing.assert_array_equal(s_served, s_local)
        # passages and vectors by global id, across shard boundaries
        got = served.get(i_served)
        assert [[p.id for p in row] for row in got] == [[f"p{i}" for i in row] for row in i_local]
        np.testing.assert_array_equal(served.vectors(i_served), data[i_local])
        # a second handle found by name sees the same service
        again = index_service.ServedStore.connect(index_service.service_name(tmp_path / "ks"))
        np.testing.assert_array_equal(again.search(queries, 5)[1], i_local[:, :5])
    finally:
        index_service.stop(served)


@pytest.mark.timeout(300)
def test_streamed_ivfpq_store_served_equals_local(ray_local, tmp_path):
    """Trained once on a sample, written chunk by chunk without an embeddings file: the
    shard actors' merged search equals the same store searched locally."""
    from fedrag_ray import index_service

    rng = np.random.default_rng(3)
    centres = _vectors(20, 4)
    data = centres[rng.integers(20, size=3000)] + 0.1 * rng.standard_normal((3000, DIM))
    data = (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float32)
    passages = _passages(len(data))
    trained = new_trained_index(DIM, "ivfpq", data[:1500], nlist=16, nprobe=4, pq_m=8)
    chunks = ((passages[i : i + 700], data[i : i + 700]) for i in range(0, 3000, 700))
    params = {"index": "ivfpq", "nlist": 16, "nprobe": 4, "hnsw_m": 32, "pq_m": 8}
    write_store(tmp_path / "pq", trained, [1000, 1000, 1000], chunks, params)
    assert not (tmp_path / "pq" / "embeddings.npy").exists()
    assert read_manifest(tmp_path / "pq")["shard_sizes"] == [1000, 1000, 1000]

    local = KnowledgeStore.load(tmp_path / "pq")
    assert [p.id for p in local.passages] == [p.id for p in passages]
    queries = data[:20]
    s_local, i_local = local.search(queries, 10)
    served, _ = index_service.start(tmp_path / "pq")
    try:
        s_served, i_served = served.search(queries, 10)
        np.testing.assert_array_equal(i_served, i_local)
        np.testing.assert_allclose(s_served, s_local, rtol=1e-5)
        # PQ reconstructions stand in for the vectors when none were kept
        np.testing.assert_allclose(served.vectors(i_served[:, :3]), local.vectors(i_local[:, :3]))
    finally:
        index_service.stop(served)


def test_merge_top_k_orders_by_score_then_id_and_drops_missing():
    from fedrag_ray.fusion import merge_top_k

    s1, i1 = np.array([[0.9, 0.5, 0.1]]), np.array([[4, 7, -1]])
    s2, i2 = np.array([[0.5, 0.3, 0.2]]), np.array([[2, 9, 11]])
    s, i = merge_top_k([s1, s2], [i1, i2], 5)
    assert i.tolist() == [[4, 2, 7, 9, 11]]  # 0.5 tie: id 2 before id 7
    np.testing.assert_allclose(s, [[0.9, 0.5, 0.5, 0.3, 0.2]])
    _, i = merge_top_k([s1[:, :3]], [i1], 3)
    assert i.tolist() == [[4, 7, -1]]
