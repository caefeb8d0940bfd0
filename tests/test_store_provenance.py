"""Content-addressed stores: a reused global store or private-shard directory built from
another corpus, encoder, index or partition is refused, naming what changed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrag_ray.config import config_from_dict
from fedrag_ray.data import RagDataset, load_dataset_from_config
from fedrag_ray.knowledge_store import MANIFEST, KnowledgeStore, KnowledgeStoreError
from fedrag_ray.provenance import differences, passages_sha256


def _cfg(**federation):
    return config_from_dict(
        {
            "seed": 0,
            "data": {"max_train": 24},
            "generator": {"model": "tiny-random"},
            "federation": {
                "num_clients": 3,
                "knowledge": "private",
                "partition": {"type": "dirichlet", "alpha": 0.5},
                **federation,
            },
        }
    )


@pytest.fixture(scope="module")
def data() -> RagDataset:
    return load_dataset_from_config(_cfg().data)


def _global_store(passages, encoder="w1") -> KnowledgeStore:
    """A stand-in for the actor-built global store: random vectors, real provenance."""
    vectors = np.random.default_rng(0).standard_normal((len(passages), 8)).astype(np.float32)
    store = KnowledgeStore(8)
    store.add(passages, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    store.provenance = {
        "encoder": {"name": "default", "weights_sha256": encoder},
        "passages_sha256": passages_sha256(passages),
    }
    return store


def test_differences_name_nested_fields():
    stored = {"partition": {"seed": 0, "alpha": 0.5}, "index": {"type": "flat"}}
    expected = {"partition": {"seed": 1, "alpha": 0.5}, "index": {"type": "flat"}, "x": 2}
    assert differences(stored, expected) == [
        "partition.seed: 0 -> 1",
        "x: not recorded -> 2",
    ]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seed": 1}, "partition.seed: 0 -> 1"),
        ({"federation.partition.alpha": 0.1}, "partition.alpha: 0.5 -> 0.1"),
        ({"federation.num_clients": 4}, "partition.num_clients: 3 -> 4"),
        ({"federation.partition.type": "iid"}, "partition.type: dirichlet -> iid"),
    ],
)
def test_reused_shard_dir_with_changed_partition_is_refused(tmp_path, data, change, named):
    from fedrag_ray.config import apply_overrides
    from fedrag_ray.federated.simulation import build_client_shards

    cfg = _cfg()
    store = _global_store(data.passages)
    assert build_client_shards(cfg, data, store, tmp_path) == 3
    assert build_client_shards(cfg, data, store, tmp_path) == 0  # same inputs: reused
    raw = apply_overrides(cfg.model_dump(mode="json"), change)
    with pytest.raises(KnowledgeStoreError, match="built from other inputs") as err:
        build_client_shards(config_from_dict(raw), data, store, tmp_path)
    assert named in str(err.value) and "shard_dir" in str(err.value)


def test_reused_shard_dir_with_changed_corpus_or_encoder_is_refused(tmp_path, data):
    from fedrag_ray.federated.simulation import build_client_shards

    cfg = _cfg()
    build_client_shards(cfg, data, _global_store(data.passages), tmp_path)
    edited = [
        *data.passages[:-1],
        type(data.passages[-1])(**{**vars(data.passages[-1]), "text": "x"}),
    ]
    with pytest.raises(KnowledgeStoreError, match=r"corpus_sha256: \w+…"):
        build_client_shards(cfg, data, _global_store(edited), tmp_path)
    with pytest.raises(KnowledgeStoreError, match="encoder.weights_sha256: w1 -> w2"):
        build_client_shards(cfg, data, _global_store(data.passages, "w2"), tmp_path)
    manifest = json.loads((tmp_path / "clients" / "client_00000" / MANIFEST).read_text())
    assert manifest["provenance"]["partition"] == {
        "type": "dirichlet",
        "alpha": 0.5,
        "field": "label",
        "seed": 0,
        "num_clients": 3,
        "knowledge": "private",
        "data_split_seed": 0,
    }


def test_global_store_checked_against_corpus_encoder_and_index(tmp_path, make_system, small_corpus):
    """The store an actor prepares before round 1 (real MiniLM encoder)."""
    from fedrag_ray.federated.knowledge import ensure_global_store

    _, passages = small_corpus
    system = make_system()
    path = tmp_path / "global"
    count, built = ensure_global_store(system, passages, path)
    assert count == len(passages) and built is not None
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["provenance"]["encoder"]["name"] == "default"
    assert len(manifest["provenance"]["encoder"]["weights_sha256"]) == 64
    assert ensure_global_store(system, passages, path) == (len(passages), None)
    with pytest.raises(KnowledgeStoreError, match="passages_sha256"):
        ensure_global_store(system, passages[:-1], path)
    other = make_system(**{"knowledge_store.index": "ivf"})
    with pytest.raises(KnowledgeStoreError, match="index.type: flat -> ivf"):
        ensure_global_store(other, passages, path)
    searched = make_system(**{"knowledge_store.nprobe": 2})  # a search setting: reused
    assert ensure_global_store(searched, passages, path)[1] is None
