"""Flower's Ray simulation backend, adjusted so it can live inside a bigger Ray program.

Flower 1.41's ``RayBackend`` (a private API: every internal used here is reached through
``fedrag_ray.compat``, which lists them, checks the versions and tests each) makes three
choices that break fedrag_ray's uses:

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
   message waited 50 ms on average before an actor got it). Flower's
   ``get_message_ins`` itself scans (and validates) every stored message per call, so
   a round of N messages cost O(N^2) there (1,000 per round: seconds); the poller takes
   all undelivered messages in one scan, with the same validity check and the same
   ``delivered_at`` stamp, in partition order.
5. each task pickles the ClientApp and the message, global arrays included, anew.
   The app is put in Ray's object store once per simulation and each round's arrays
   record once per round (the round's train messages share one); tasks carry only
   references, and an actor deserialises each at most once (``FedRagClientActor``).

:class:`SimulationNodes` hands the server the partition ↔ node mapping the engine
registers (``vce_api._register_nodes``), so there is no per-node discovery message; it is
installed with Flower's stock backend too (``fedrag_backend(stock=True)``, the baseline
of benchmarks/simulation_scale.py).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import ray
from flwr.app import Message, RecordDict

from fedrag_ray import compat
from fedrag_ray.federated.protocol import ARRAYS_KEY

FLWR_VERSION = compat.TESTED_VERSIONS["flwr"]
BasicActorPool, VirtualClientEngineActor = compat.flower_actor_classes()
log = compat.flower_log


class SimulationNodes:
    """The partition ↔ node mapping of a simulation, published by the engine when it
    registers its nodes (after the ServerApp thread has started)."""

    def __init__(self) -> None:
        self._registered = threading.Event()
        self.partition_to_node: dict[int, int] = {}

    def publish(self, node_to_partition: dict[int, int]) -> None:
        self.partition_to_node = {p: n for n, p in node_to_partition.items()}
        self._registered.set()

    def wait(self, timeout: float) -> dict[int, int]:
        if not self._registered.wait(timeout):
            raise TimeoutError(
                f"the simulation engine registered no nodes within {timeout:g} s "
                "(federation.round_timeout_s)"
            )
        return self.partition_to_node


@ray.remote
class FedRagClientActor(VirtualClientEngineActor):
    """Flower's ClientAppActor, fed by object references: the ClientApp and the round's
    arrays are fetched (and deserialised) once per actor, not once per task."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[str, Any]] = {}

    def _get(self, slot: str, ref: ray.ObjectRef) -> Any:
        key = ref.hex()
        cached = self._cache.get(slot)
        if cached is None or cached[0] != key:
            cached = (key, ray.get(ref))
            self._cache[slot] = cached
        return cached[1]

    def run_shared(
        self, app: list[ray.ObjectRef], message: Message, arrays: list[ray.ObjectRef], *args: Any
    ) -> tuple[str, Message, Any]:
        """``app`` / ``arrays``: one reference each (in lists, so that Ray passes the
        reference rather than resolving it for every task)."""
        if arrays:
            message.content = RecordDict(
                {**dict(message.content.items()), ARRAYS_KEY: self._get("arrays", arrays[0])}
            )
        return self.run(self._get("app", app[0]), message, *args)


class PoolExhausted(RuntimeError):
    """No idle client actor to run a message on (they died and could not be replaced)."""


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
        self.create_actor_fn = lambda: FedRagClientActor.options(  # type: ignore[attr-defined]
            **resources, resources=custom, **options
        ).remote()
        self.actors_capacity = num_actors
        self._future_to_actor = {}

    def replace_dead_actor(self, future: Any) -> None:
        """A fresh actor in place of the one that ran ``future`` and died. If Ray cannot
        create one, the pool is one actor smaller and the error says why (it used to be
        swallowed: the pool could shrink to zero with nobody told)."""
        self._future_to_actor.pop(future, None)
        try:
            actor = self.create_actor_fn()
        except Exception as err:
            self.num_actors -= 1
            log(40, "could not replace a dead client actor (%d left): %s", self.num_actors, err)
            raise RuntimeError(
                f"could not replace a dead client actor ({self.num_actors} left in the pool): {err}"
            ) from err
        self.pool.append(actor)

    def submit(self, actor_fn: Any, job: Any) -> Any:
        """Flower's ``submit``, with a clear error instead of ``pop from empty list``
        when no actor is idle (every one died and could not be replaced)."""
        if not self.pool:
            raise PoolExhausted(
                f"no client actor left idle in the pool ({self.num_actors} alive): the others "
                "died and could not be replaced (see the errors above)"
            )
        return super().submit(actor_fn, job)


class FedRagRayBackend(compat.flower_ray_backend_module().RayBackend):  # type: ignore[misc]
    def __init__(self, backend_config: dict[str, Any]) -> None:
        self.fedrag = dict(backend_config.get("fedrag") or {})
        super().__init__(backend_config)
        self._app_ref: ray.ObjectRef | None = None
        self._lock = threading.Lock()
        self._shared: tuple[Any, ray.ObjectRef] | None = None  # (arrays record, its ref)

    def _validate_client_resources(self, config: dict[str, Any]) -> dict[str, Any]:
        return dict(config.get("client_resources") or {"num_cpus": 1, "num_gpus": 0.0})

    def build(self, app_fn: Any) -> None:
        num_actors = int(self.fedrag.get("num_actors") or 1)
        self.pool = FedRagActorPool(self.client_resources, num_actors, self.fedrag.get("env_vars"))
        self.pool.add_actors_to_pool(num_actors)
        self.app_fn = app_fn
        self._app_ref = ray.put(app_fn)

    def _without_arrays(self, message: Message) -> tuple[Message, list[ray.ObjectRef]]:
        """The message minus its arrays record, and a reference to that record in the
        object store, put there by the first of the round's messages that carries it."""
        if not message.has_content() or ARRAYS_KEY not in message.content:
            return message, []
        record = message.content[ARRAYS_KEY]
        with self._lock:
            if self._shared is None or self._shared[0] is not record:
                self._shared = (record, ray.put(record))
            ref = self._shared[1]
        rest = RecordDict({k: v for k, v in message.content.items() if k != ARRAYS_KEY})
        return compat.make_message(message.metadata, rest), [ref]

    def process_message(self, message: Any, context: Any) -> Any:
        if self.pool is None or self.app_fn is None or self._app_ref is None:
            raise ValueError("backend not built")
        light, arrays = self._without_arrays(message)
        app = [self._app_ref]
        future = self.pool.submit(
            lambda a, _fn, mssg, cid, state: a.run_shared.remote(app, mssg, arrays, cid, state),
            (self.app_fn, light, str(context.node_config["partition-id"]), context),
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


POLL_INTERVAL_S = 0.01


def _add_messages_to_queue(state: Any, queue: Any, nodes_mapping: Any, f_stop: Any) -> None:
    """Flower's poller, in one scan per cycle: every undelivered message for a known node
    (one per node per cycle, as Flower's ``limit=1``), checked as ``get_message_ins``
    checks it (expired or invalid ones are deleted), stamped delivered, queued in
    partition order; every ``POLL_INTERVAL_S``. Only messages stored since the last
    cycle are looked at, so an idle cycle costs a set difference."""
    internals = compat.linkstate_internals(state)
    if internals is None:  # not the in-memory LinkState
        return compat.flower_poller()(state, queue, nodes_mapping, f_stop)
    store, lock, check = internals
    queued: set[str] = set()  # ids of messages this poller has queued (or dropped)
    while not f_stop.is_set():
        ready: list[Message] = []
        with lock:
            fresh = store.keys() - queued  # a set difference in C: no Python loop per cycle
            pending = {
                mid
                for mid in fresh
                if not store[mid].metadata.delivered_at
                and store[mid].metadata.dst_node_id in nodes_mapping
            }
            queued |= fresh - pending  # already delivered, or for no node of ours
            if pending:
                check(pending)
                seen: set[int] = set()
                for mid in pending:
                    m = store.get(mid)
                    if m is None:
                        queued.add(mid)
                    elif m.metadata.dst_node_id not in seen:
                        seen.add(m.metadata.dst_node_id)
                        ready.append(m)
                        queued.add(mid)
                ready.sort(key=lambda m: nodes_mapping[m.metadata.dst_node_id])
                stamp = compat.flower_now().isoformat()
                for m in ready:
                    m.metadata.delivered_at = stamp
            if len(queued) > 2 * len(store) + 10_000:
                queued &= store.keys()
        for m in ready:
            queue.put(m)
        f_stop.wait(POLL_INTERVAL_S)


@contextlib.contextmanager
def fedrag_backend(nodes: SimulationNodes | None = None, stock: bool = False) -> Iterator[None]:
    """For the duration of one simulation: route Flower's ``backend_fn`` (which imports
    ``raybackend.RayBackend`` at call time) to ``FedRagRayBackend`` and its poller to
    ``_add_messages_to_queue`` (looked up when the engine starts its thread), unless
    ``stock``; and publish the registered nodes to ``nodes``."""

    def wrap(flower_register_nodes: Any) -> Any:
        def register_nodes(*args: Any, **kwargs: Any) -> dict[int, int]:
            mapping = flower_register_nodes(*args, **kwargs)
            if nodes is not None:
                nodes.publish(mapping)
            return mapping

        return register_nodes

    backend = None if stock else FedRagRayBackend
    poller = None if stock else _add_messages_to_queue
    with compat.flower_simulation_hooks(wrap, backend, poller):
        yield
