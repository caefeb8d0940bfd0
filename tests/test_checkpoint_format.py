"""Round checkpoints are safetensors + JSON (version 3): they round-trip the arrays, a
strategy's state and the privacy / schedule record exactly, hold no pickle, and any
other version is refused with an error that names it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrag_ray.federated.checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointError,
    RoundCheckpoint,
    load_checkpoint,
    save_checkpoint,
)


def test_a_checkpoint_round_trips_exactly_without_pickle(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "generator.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "retriever.lora_B.weight": np.asfortranarray(rng.standard_normal((8, 4))),
        "scalar": np.array(2.5, dtype=np.float32),
    }
    strategy = {
        "current_arrays": {k: v + 1 for k, v in arrays.items()},
        "m_t": {k: v * 0.1 for k, v in arrays.items()},
        "v_t": None,
    }
    extra = {
        "schedule_rounds": 5,
        "privacy": {"noise_multiplier": 1.1, "accountant": {"events": [[1, 0.5]]}},
    }
    aux = {"v2/generator.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32)}
    save_checkpoint(tmp_path, RoundCheckpoint(3, arrays, strategy, "abc", extra, aux))
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["meta.json", "state.safetensors"]
    meta = json.loads((tmp_path / "checkpoint" / "meta.json").read_text())
    assert meta["version"] == CHECKPOINT_VERSION == 3
    got = load_checkpoint(tmp_path, "abc")
    assert got.round == 3 and got.config_hash == "abc" and got.extra == extra
    assert list(got.arrays) == list(arrays)
    for k, v in arrays.items():
        assert got.arrays[k].dtype == v.dtype and np.array_equal(got.arrays[k], v)
    assert list(got.aux_arrays) == list(aux)
    assert np.array_equal(
        got.aux_arrays["v2/generator.lora_A.weight"], aux["v2/generator.lora_A.weight"]
    )
    assert got.strategy_state["v_t"] is None
    for attr in ("current_arrays", "m_t"):
        assert list(got.strategy_state[attr]) == list(arrays)
        for k, v in strategy[attr].items():
            assert np.array_equal(got.strategy_state[attr][k], v)


def test_another_checkpoint_version_is_refused_by_name(tmp_path):
    save_checkpoint(tmp_path, RoundCheckpoint(1, {"w": np.ones(2)}, {}, "abc"))
    meta_path = tmp_path / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(CheckpointError, match="version 2 unsupported.*reads version 3"):
        load_checkpoint(tmp_path)


def test_resumable_only_for_this_experiments_checkpoint_in_this_version(tmp_path):
    """What long benchmarks use to pick a killed run up: a run directory without a
    checkpoint, with another experiment's, or with an old version's starts afresh."""
    from fedrag_ray.config import ConfigError, load_config
    from fedrag_ray.federated.checkpoint import config_fingerprint
    from fedrag_ray.preflight import check_resume, resumable

    cfg = load_config("quickstart")
    other = load_config("quickstart", {"train.lr": 0.5})
    assert not resumable(cfg, tmp_path)
    fp = config_fingerprint(cfg.model_dump_json())
    save_checkpoint(tmp_path, RoundCheckpoint(2, {"w": np.ones(2)}, {}, fp))
    assert resumable(cfg, tmp_path)
    assert resumable(cfg.model_copy(update={"seed": cfg.seed}), tmp_path)
    assert not resumable(other, tmp_path)
    meta_path = tmp_path / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "version": 2}))
    assert not resumable(cfg, tmp_path)
    with pytest.raises(ConfigError, match="version 2 checkpoint.*reads version 3"):
        check_resume(cfg, tmp_path)  # `--resume` says so before Ray starts
