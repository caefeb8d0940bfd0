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

4. its message poller (``vce_api.add_messages_to_queue``) asks *every* node for messages
   every 0.1 s, and each ask scans every stored message: O(nodes x messages) per cycle.
   At 1,000 virtual clients that thread took most of a core (58 % of the simulation's
   wall time, see benchmarks/simulation_scale.py) and slowed the client actors.
   ``_add_messages_to_queue`` asks only the nodes that have an undelivered message; a
   cycle then costs next to nothing, so it runs every 10 ms instead of every 100 ms (a
   message waited 50 ms on average before an actor got it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import ray
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor
from flwr.supercore import log

FLWR_VERSION = "1.41.0"


class FedRagActorPool(BasicActorPool):
    def __init__(
        self,
        client_resources: dict[str, Any],
        num_actors: int,
        env_vars: dict[str, str] | None = None,
    ) -> None:
        resources = dict(client_resources)
        custom = resources.pop("resources", None) or {}
        self.client_resources = resources
        self.pool = []
        self.num_actors = 0
        # This run's environment (offline mode, cache dir, fault injection, quiet mode) on
        # every actor it creates, also when Ray was started earlier by someone else with
        # another environment (a notebook, a test session, a joined cluster).
        options: dict[str, Any] = {"runtime_env": {"env_vars": dict(env_vars)}} if env_vars else {}
        self.create_actor_fn = lambda: ClientAppActor.options(  # type: ignore[attr-defined]
            **resources, resources=custom, **options
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
        self.pool = FedRagActorPool(self.client_resources, num_actors, self.fedrag.get("env_vars"))
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


_flower_add_messages_to_queue = vce_api.add_messages_to_queue
POLL_INTERVAL_S = 0.01


def _add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
    """Flower's poller, but only nodes with an undelivered message are asked (same order,
    same ``get_message_ins(limit=1)`` call), every ``POLL_INTERVAL_S``."""
    store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
    if store is None or lock is None:  # not the in-memory LinkState: Flower's own loop
        return _flower_add_messages_to_queue(state, queue, nodes_mapping, f_stop)
    while not f_stop.is_set():
        with lock:
            pending = {
                m.metadata.dst_node_id for m in store.values() if not m.metadata.delivered_at
            }
        if pending:
            for node_id in [n for n in nodes_mapping if n in pending]:
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
        f_stop.wait(POLL_INTERVAL_S)


@contextlib.contextmanager
def fedrag_backend() -> Iterator[None]:
    """Route Flower's ``backend_fn`` (which imports ``raybackend.RayBackend`` at call time)
    to ``FedRagRayBackend``, and its poller to ``_add_messages_to_queue`` (looked up when
    the engine starts its thread), for the duration of one simulation."""
    original = raybackend.RayBackend
    raybackend.RayBackend = FedRagRayBackend  # type: ignore[misc]
    vce_api.add_messages_to_queue = _add_messages_to_queue  # type: ignore[assignment]
    try:
        yield
    finally:
        raybackend.RayBackend = original  # type: ignore[misc]
        vce_api.add_messages_to_queue = _flower_add_messages_to_queue  # type: ignore[assignment]
