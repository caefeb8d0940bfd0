"""fedrag_ray's actor pool on Flower's Ray backend: a dead actor that cannot be replaced
is an error that names why, not a pool that silently shrinks (to zero, after which every
message waited for an actor until ``round_timeout_s``)."""

from __future__ import annotations

import logging

import pytest


def test_a_dead_actor_that_cannot_be_replaced_is_an_error_naming_why(caplog):
    """Ray itself refuses the replacement here (an env var that is not a string is
    rejected when the actor is created), before Ray is even started."""
    from fedrag_ray.federated.ray_backend import FedRagActorPool, PoolExhausted

    pool = FedRagActorPool({"num_cpus": 1}, 1, env_vars={"FEDRAG_RAY_X": 1})  # type: ignore[dict-item]
    pool.num_actors = 1  # one actor was running and died with the future below
    future = object()
    pool._future_to_actor[future] = "dead actor"
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="could not replace"):
        pool.replace_dead_actor(future)
    assert "must be of type Dict[str, str]" in caplog.text
    assert pool.num_actors == 0 and pool.pool == []
    # with no actor left, a message fails at once with the reason instead of waiting
    with pytest.raises(PoolExhausted, match="no client actor left"):
        pool.submit(lambda *a: None, (None, None, "0", None))
