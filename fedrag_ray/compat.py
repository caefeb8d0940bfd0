"""Every private Flower, Ray and PEFT internal fedrag_ray touches, in one module.

fedrag_ray changes how Flower's simulation engine runs inside a bigger Ray program
(``federated/ray_backend.py``), trims the Ray head it starts (``federated/ray_head.py``),
pulls replies faster from Flower's in-memory grid (``federated/server_app.py``) and keeps
bitsandbytes out of peft's first import (``peft_import.py``). Those modules reach the
internals below only through this one; ``tests/test_compat.py`` has a test per symbol,
and :func:`check_versions` refuses to start on versions other than the tested ones
(``FEDRAG_RAY_SKIP_VERSION_CHECK=1`` opts out). Where an internal is missing, the code
falls back to the stock behaviour and says so in the log (:func:`fallback`).

Flower (tested: flwr 1.41.0)

1. ``flwr.server.superlink.fleet.vce.vce_api._register_nodes`` — wrapped for one
   simulation to publish the partition → node mapping it registers
   (``ray_backend.SimulationNodes``): no per-node discovery messages.
2. ``vce_api.add_messages_to_queue`` — replaced for one simulation by fedrag_ray's
   poller (one scan per cycle, every 10 ms). Looked up when the engine starts its thread.
3. ``flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend`` — replaced for one
   simulation by ``FedRagRayBackend`` (the engine's ``backend_fn`` reads the name at call
   time); the subclass overrides ``_validate_client_resources``, ``build``,
   ``process_message`` and ``terminate`` and sets ``pool`` and ``app_fn``.
4. ``flwr.simulation.ray_transport.ray_actor.BasicActorPool`` — subclassed without
   calling its ``__init__`` (which sizes the pool from the whole cluster): the subclass
   sets the attributes the inherited methods use, :data:`ACTOR_POOL_ATTRIBUTES`.
5. ``ray_actor.VirtualClientEngineActor`` — subclassed (``FedRagClientActor`` calls its
   ``run(client_app_fn, message, cid, context)``).
6. ``InMemoryLinkState`` internals read by the poller: ``message_ins_store``, ``lock``,
   ``_check_stored_messages`` and ``Metadata.delivered_at`` (:func:`linkstate_internals`;
   fallback: Flower's own poller).
7. ``InMemoryGrid`` internals read by ``FederatedServer.send_and_receive``:
   ``grid.state.message_ins_id_to_message_res_id`` and ``grid.state.lock``
   (:func:`grid_internals`; fallback: ``Grid.send_and_receive``).
8. ``flwr.app.message.message.make_message`` — a message rebuilt with its metadata
   (the backend strips the shared arrays record from a task).
9. ``flwr.supercore.log`` and ``flwr.supercore.date.now`` — Flower's logger and the
   timestamp the poller stamps ``delivered_at`` with.

Ray (tested: ray 2.55.1)

10. ``ray._private.node.Node.start_monitor`` and ``Node.start_api_server`` — stubbed for
    the one ``ray.init`` that starts a local head (``ray_head.lean_local_head``;
    fallback: the stock head).
11. ``ray.init(_system_config={"prestart_worker_first_driver": False})`` — a private
    system-config key (:data:`RAY_NO_PRESTART`).
12. ``RAY_worker_niceness`` — the raylet's config read from the environment
    (``ray_head.workers_at_driver_niceness``).

PEFT (tested: peft 0.21)

13. ``peft.import_utils.is_bnb_available`` / ``is_bnb_4bit_available`` (their
    ``lru_cache`` cleared) and ``peft.helpers.bnb`` (rebound) — so that a quantized
    model after a bitsandbytes-free first import still gets bnb layers
    (:func:`make_peft_see_bitsandbytes`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

logger = logging.getLogger("fedrag_ray.compat")

# The versions the internals above were checked against. flwr and ray exactly (pinned
# in pyproject.toml); peft by major.minor (a range in pyproject.toml; its two symbols are
# old and stable within a series).
TESTED_VERSIONS = {"flwr": "1.41.0", "ray": "2.55.1", "peft": "0.21"}
SKIP_VERSION_CHECK_ENV = "FEDRAG_RAY_SKIP_VERSION_CHECK"

ACTOR_POOL_ATTRIBUTES = (
    "client_resources",
    "pool",
    "num_actors",
    "create_actor_fn",
    "actors_capacity",
    "_future_to_actor",
)
RAY_NO_PRESTART = {"prestart_worker_first_driver": False}
RAY_HEAD_DAEMON_METHODS = ("start_monitor", "start_api_server")  # ray._private.node.Node


class VersionMismatch(RuntimeError):
    """flwr / ray / peft are not the versions fedrag_ray's private hooks were tested on."""


def _matches(installed: str | None, tested: str) -> bool:
    if installed is None:
        return False
    return installed == tested or installed.startswith(tested + ".")


def check_versions(installed: Mapping[str, str | None] | None = None) -> None:
    """Refuse to start, in one line, when an installed flwr / ray / peft is not the
    tested version (``installed``: name → version, default what is installed here).
    ``FEDRAG_RAY_SKIP_VERSION_CHECK=1`` runs anyway (at one's own risk: the hooks may
    then fall back, as logged, or break)."""
    if os.environ.get(SKIP_VERSION_CHECK_ENV, "").strip().lower() not in ("", "0", "false"):
        return
    if installed is None:
        installed = {name: _installed(name) for name in TESTED_VERSIONS}
    wrong = [
        f"{name} {installed.get(name) or 'missing'} (tested: {tested})"
        for name, tested in TESTED_VERSIONS.items()
        if not _matches(installed.get(name), tested)
    ]
    if wrong:
        raise VersionMismatch(
            f"fedrag_ray patches private internals of versions it was not tested with: "
            f"{', '.join(wrong)}; install the tested versions or set "
            f"{SKIP_VERSION_CHECK_ENV}=1 to run anyway"
        )


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


_FALLBACKS_LOGGED: set[str] = set()


def fallback(what: str, instead: str) -> None:
    """Log (once per process) that an internal is missing and the stock path is taken."""
    if what not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add(what)
        logger.warning("fedrag_ray compat: %s not found; using %s instead", what, instead)


# --------------------------------------------------------------------------- Flower


def flower_engine() -> Any:
    """``vce_api``: the simulation engine module whose names 1 and 2 are swapped."""
    from flwr.server.superlink.fleet.vce import vce_api

    return vce_api


def flower_ray_backend_module() -> Any:
    """The module whose ``RayBackend`` (3) the engine instantiates."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    return raybackend


def flower_actor_classes() -> tuple[type, type]:
    """(``BasicActorPool``, ``VirtualClientEngineActor``): 4 and 5."""
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool, VirtualClientEngineActor

    return BasicActorPool, VirtualClientEngineActor


def make_message(metadata: Any, content: Any) -> Any:
    """8: a message with ``metadata`` and new ``content``."""
    from flwr.app.message.message import make_message as flower_make_message

    return flower_make_message(metadata, content)


def flower_log(level: int, msg: str, *args: Any) -> None:
    """9: Flower's logger (the simulation's own log lines)."""
    from flwr.supercore import log

    log(level, msg, *args)


def flower_now() -> Any:
    """9: Flower's timestamp (``delivered_at``)."""
    from flwr.supercore.date import now

    return now()


@contextlib.contextmanager
def flower_simulation_hooks(
    register_nodes: Callable[[Callable[..., dict[int, int]]], Callable[..., dict[int, int]]],
    backend: type | None,
    poller: Callable[..., None] | None,
) -> Iterator[None]:
    """For one simulation: Flower's ``_register_nodes`` wrapped by ``register_nodes``
    (given Flower's, returns the replacement), and, unless None, ``RayBackend`` replaced
    by ``backend`` and the message poller by ``poller``; all restored on the way out."""
    vce_api = flower_engine()
    raybackend = flower_ray_backend_module()
    saved = (raybackend.RayBackend, vce_api.add_messages_to_queue, vce_api._register_nodes)
    _STOCK.setdefault("poller", saved[1])
    vce_api._register_nodes = register_nodes(saved[2])
    if backend is not None:
        raybackend.RayBackend = backend
    if poller is not None:
        vce_api.add_messages_to_queue = poller
    try:
        yield
    finally:
        raybackend.RayBackend, vce_api.add_messages_to_queue, vce_api._register_nodes = saved


_STOCK: dict[str, Any] = {}  # Flower's originals, kept at the first swap


def flower_poller() -> Callable[..., None]:
    """Flower's own message poller (2), the fallback of fedrag_ray's."""
    return _STOCK.get("poller") or flower_engine().add_messages_to_queue


def linkstate_internals(state: Any) -> tuple[dict[str, Any], Any, Callable[..., Any]] | None:
    """6: (``message_ins_store``, ``lock``, ``_check_stored_messages``) of an in-memory
    LinkState, or None (logged) when this state lacks one of them."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    check = getattr(state, "_check_stored_messages", None)
    if store is None or lock is None or check is None:
        fallback(
            "InMemoryLinkState.message_ins_store/lock/_check_stored_messages", "Flower's poller"
        )
        return None
    return store, lock, check


def grid_internals(grid: Any) -> tuple[dict[str, str], Any] | None:
    """7: (``state.message_ins_id_to_message_res_id``, ``state.lock``) of Flower's
    in-memory grid, or None (logged) for another grid (Flower's ``send_and_receive``)."""
    state = getattr(grid, "state", None)
    replied = getattr(state, "message_ins_id_to_message_res_id", None)
    lock = getattr(state, "lock", None)
    if replied is None or lock is None or not hasattr(grid, "pull_messages"):
        fallback(
            "InMemoryGrid.state.message_ins_id_to_message_res_id/lock", "Grid.send_and_receive"
        )
        return None
    return replied, lock


# --------------------------------------------------------------------------- Ray


def ray_node_class() -> type | None:
    """10: ``ray._private.node.Node`` if it has both head-daemon methods, else None
    (logged: the stock head is started)."""
    from ray._private import node

    if not all(m in vars(node.Node) for m in RAY_HEAD_DAEMON_METHODS):
        fallback("ray._private.node.Node.start_monitor/start_api_server", "the stock Ray head")
        return None
    return node.Node


# --------------------------------------------------------------------------- PEFT


def cache_peft_bitsandbytes_unavailable() -> None:
    """13: let peft (imported while bitsandbytes was hidden) cache "unavailable" for its
    LoRA dispatch."""
    from peft.import_utils import is_bnb_available

    is_bnb_available()


def make_peft_see_bitsandbytes(bnb: Any) -> None:
    """13: undo a hidden import: peft caches bitsandbytes' availability with
    ``lru_cache`` and ``peft.helpers`` binds the module (or None) at import."""
    import sys

    utils = sys.modules.get("peft.import_utils")
    if utils is not None:
        utils.is_bnb_available.cache_clear()
        utils.is_bnb_4bit_available.cache_clear()
    helpers = sys.modules.get("peft.helpers")
    if helpers is not None and getattr(helpers, "bnb", None) is None:
        helpers.bnb = bnb
