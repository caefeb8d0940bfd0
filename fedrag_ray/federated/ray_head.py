"""The embedded Ray head a local run starts, without the two head daemons it never uses.

``ray.init()`` on one machine starts, besides GCS, raylet and their agents, the autoscaler
monitor and the dashboard's API server, even with ``include_dashboard=False`` (it then
serves ``ray job`` and the state API). A local simulation has one fixed node, so nothing
to autoscale, and reads nothing from either; the two Python processes held ~190 MiB RSS
on every run (0.94 → 0.75 GiB for a head plus two idle actors, measured here). Logs still
reach the driver: that is the log monitor, which stays.

Ray exposes no switch for either daemon on ``ray.init`` (``ray start`` has a hidden
``--no-monitor`` only), so :func:`lean_local_head` stubs the two ``Node`` methods that
start them for the duration of one ``ray.init``. Clusters joined with ``--address`` are
never touched. ``FEDRAG_RAY_FULL_RAY_HEAD=1`` starts the stock head (e.g. to use
``ray status`` or ``ray list actors`` against a local run).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fedrag_ray.runtime import env_flag

FULL_HEAD_ENV = "FEDRAG_RAY_FULL_RAY_HEAD"
WORKER_NICENESS_ENV = "RAY_worker_niceness"  # read by the raylet a local ray.init starts
SKIPPED_METHODS = ("start_monitor", "start_api_server")  # ray._private.node.Node


def workers_at_driver_niceness() -> None:
    """Make the workers of a Ray head started by this process run at this process's own
    niceness instead of Ray's default 15. The client actors do all of a run's compute; at
    nice 15 any normal-priority process beside them (another job, a test, an editor's
    indexer) takes nearly all the CPU and a run looks hung. An explicit
    ``RAY_worker_niceness`` in the environment wins. The raylet applies it as an
    *increment* to the niceness it inherited from this process, so 0 means "the same as
    the driver". Clusters set it on ``ray start`` (``clusters/README.md``)."""
    import os

    os.environ.setdefault(WORKER_NICENESS_ENV, "0")


@contextlib.contextmanager
def lean_local_head() -> Iterator[None]:
    """Wrap the ``ray.init`` that starts a local head. A no-op when opted out or when this
    Ray's ``Node`` lacks the methods (``tests/test_ray_head.py`` then fails)."""
    from ray._private import node

    if env_flag(FULL_HEAD_ENV) or not all(m in vars(node.Node) for m in SKIPPED_METHODS):
        yield
        return
    saved = {m: vars(node.Node)[m] for m in SKIPPED_METHODS}
    try:
        for m in SKIPPED_METHODS:
            setattr(node.Node, m, _skip)
        yield
    finally:
        for m, fn in saved.items():
            setattr(node.Node, m, fn)


def _skip(self: object, *args: object, **kwargs: object) -> None:
    return None
