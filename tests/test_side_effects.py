"""Library calls leave the caller's process as they found it: global RNGs, warning filters
and the garbage collector's frozen set come back after seeding, quieting and freezing."""

from __future__ import annotations

import gc
import random
import warnings

import numpy as np
import pytest
import torch


def _np_state_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_seeded_blocks_put_every_global_rng_back():
    from fedrag_ray.runtime import seeded, torch_seeded

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    with seeded(7):
        inside = (random.random(), np.random.rand(), torch.rand(1).item())
    with seeded(7):  # the same draws for the same seed
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == inside
    with torch_seeded(3):
        torch.rand(4)
    assert random.getstate() == py and _np_state_equal(np.random.get_state(), npy)
    assert torch.equal(torch.get_rng_state(), th)


def test_dp_noise_rng_is_seeded_for_the_aggregation_only():
    from fedrag_ray.config import PrivacyConfig
    from fedrag_ray.federated.privacy import noise_rng

    np.random.seed(5)
    before = np.random.get_state()
    pcfg = PrivacyConfig(noise_seed=11)
    with noise_rng(pcfg, 2):
        first = np.random.rand(3)
    with noise_rng(pcfg, 2):
        assert np.array_equal(np.random.rand(3), first)  # reproducible per round
    with noise_rng(pcfg, 3):
        assert not np.array_equal(np.random.rand(3), first)
    assert _np_state_equal(np.random.get_state(), before)


def test_quiet_warnings_is_scoped():
    from fedrag_ray.runtime import quiet_warnings

    filters = list(warnings.filters)
    with quiet_warnings():
        pass
    assert warnings.filters == filters


def test_frozen_gc_is_undone_on_every_way_out():
    from fedrag_ray.federated.server_app import frozen_gc

    with frozen_gc():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), frozen_gc():
        raise RuntimeError("a round failed")
    assert gc.get_freeze_count() == 0


def test_building_a_lora_model_leaves_torchs_rng_alone():
    """LoRA's random init is seeded (same seed, same adapter) inside the constructor
    only; it used to seed torch's global RNG for the whole process."""
    from fedrag_ray.config import GeneratorConfig
    from fedrag_ray.generator import Generator

    torch.manual_seed(123)
    state = torch.get_rng_state()
    cfg = GeneratorConfig(model="tiny-random", max_length=32, autocast="none")
    a = Generator(cfg, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    b = Generator(cfg, seed=0)
    for (name, p), (_, q) in zip(
        a.model.named_parameters(), b.model.named_parameters(), strict=True
    ):
        if "lora_" in name:
            assert torch.equal(p, q), name
