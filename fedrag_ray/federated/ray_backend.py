"""Flower's Ray simulation backend, adjusted so it can live inside a bigger Ray program.

Flower 1.41's ``RayBackend`` (a private API, hence the exact ``flwr==1.41.0`` pin and a
test that fails if these hooks move) makes three choices that break fedrag_ray's uses:

1. it sizes its actor pool from the *whole cluster* (``pool_size_from_resources``). Inside
   a Ray Tune trial whose placement group holds fewer slots, the extra actors never get
   scheduled and round 1 hangs;
2. ``terminate()`` calls ``ray.shutdown()``, which kills a Tune trial (or a caller's Ray);
3. a dead actor is put back into the pool, so every later message routed to it fails.

``FedRagRayBackend`` keeps Flower's pool and message flow and changes only these: the pool
size comes from fedrag_ray (``backend_config["fedrag"]["num_actors"]``, computed from the
trial's bundles or the cluster's nodes), Ray is left running for its owner, and a dead
actor is replaced by a fresh one before the error is reported as a failed client.
Custom Ray resources per client (``{"client_slot": 1}``) are passed to the actors too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import ray
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor
from flwr.supercore import log

FLWR_VERSION = "1.41.0"


class FedRagActorPool(BasicActorPool):
    def __init__(self, client_resources: dict[str, Any], num_actors: int) -> None:
        resources = dict(client_resources)
        custom = resources.pop("resources", None) or {}
        self.client_resources = resources
        self.pool = []
        self.num_actors = 0
        self.create_actor_fn = lambda: ClientAppActor.options(  # type: ignore[attr-defined]
            **resources, resources=custom
        ).remote()
        self.actors_capacity = num_actors
        self._future_to_actor = {}

    def replace_dead_actor(self, future: Any) -> None:
        self._future_to_actor.pop(future, None)
        with contextlib.suppress(Exception):
            self.pool.append(self.create_actor_fn())


class FedRagRayBackend(raybackend.RayBackend):
    def __init__(self, backend_config: dict[str, Any]) -> None:
        self.fedrag = dict(backend_config.get("fedrag") or {})
        super().__init__(backend_config)

    def _validate_client_resources(self, config: dict[str, Any]) -> dict[str, Any]:
        return dict(config.get("client_resources") or {"num_cpus": 1, "num_gpus": 0.0})

    def build(self, app_fn: Any) -> None:
        num_actors = int(self.fedrag.get("num_actors") or 1)
        self.pool = FedRagActorPool(self.client_resources, num_actors)
        self.pool.add_actors_to_pool(num_actors)
        self.app_fn = app_fn

    def process_message(self, message: Any, context: Any) -> Any:
        if self.pool is None or self.app_fn is None:
            raise ValueError("backend not built")
        future = self.pool.submit(
            lambda a, a_fn, mssg, cid, state: a.run.remote(a_fn, mssg, cid, state),
            (self.app_fn, message, str(context.node_config["partition-id"]), context),
        )
        try:
            return self.pool.fetch_result_and_return_actor_to_pool(future)
        except ray.exceptions.RayActorError:
            log(30, "client actor died; replacing it and reporting the client as failed")
            self.pool.replace_dead_actor(future)
            raise
        except Exception:
            self.pool.add_actor_back_to_pool(future)
            raise

    def terminate(self) -> None:
        if self.pool:
            self.pool.terminate_all_actors()
        if self.fedrag.get("shutdown_ray", False):
            ray.shutdown()


@contextlib.contextmanager
def fedrag_backend() -> Iterator[None]:
    """Route Flower's ``backend_fn`` (which imports ``raybackend.RayBackend`` at call time)
    to ``FedRagRayBackend`` for the duration of one simulation."""
    original = raybackend.RayBackend
    raybackend.RayBackend = FedRagRayBackend  # type: ignore[misc]
    try:
        yield
    finally:
        raybackend.RayBackend = original  # type: ignore[misc]
