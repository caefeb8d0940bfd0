"""The embedded Ray head a local run starts, without the two head daemons it never uses.

``ray.init()`` on one machine starts, besides GCS, raylet and their agents, the autoscaler
monitor and the dashboard's API server, even with ``include_dashboard=False`` (it then
serves ``ray job`` and the state API). A local simulation has one fixed node, so nothing
to autoscale, and reads nothing from either; the two Python processes held ~190 MiB RSS
on every run (0.94 → 0.75 GiB for a head plus two idle actors, measured here). Logs still
reach the driver: that is the log monitor, which stays.

Ray exposes no switch for either daemon on ``ray.init`` (``ray start`` has a hidden
``--no-monitor`` only), so :func:`lean_local_head` stubs the two ``Node`` methods that
start them for the duration of one ``ray.init`` (both internals: ``fedrag_ray.compat``).
Clusters joined with ``--address`` are never touched. ``FEDRAG_RAY_FULL_RAY_HEAD=1`` starts
the stock head (e.g. to use ``ray status`` or ``ray list actors`` against a local run).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

from fedrag_ray import compat
from fedrag_ray.runtime import env_flag

FULL_HEAD_ENV = "FEDRAG_RAY_FULL_RAY_HEAD"
WORKER_NICENESS_ENV = "RAY_worker_niceness"  # read by the raylet a local ray.init starts
SKIPPED_METHODS = compat.RAY_HEAD_DAEMON_METHODS  # of ray._private.node.Node


def start_or_join_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    env_vars: dict[str, str] | None = None,
    log_to_driver: bool = True,
) -> bool:
    """The one way fedrag_ray starts or joins Ray (simulations, sweeps, ``ask``'s shard
    actors). Returns True when this call started Ray (its caller then shuts it down);
    a Ray already initialised in this process is used as it is.

    Joining (``address``: ``auto`` or ``HOST:PORT``) touches nothing of the cluster. A
    local head gets ``num_cpus`` (default: every core), workers at the driver's niceness
    (:func:`workers_at_driver_niceness`), no prestarted idle workers (Ray prestarts one
    Python worker per CPU for the first driver; actors started with a runtime env never
    reuse them, so they only held ~85 MiB each) and no monitor / dashboard API server
    (:func:`lean_local_head`). ``env_vars`` becomes the job's runtime env, so it also
    reaches the workers of a joined cluster, whose raylets never saw this shell."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, object] = {"include_dashboard": False, "log_to_driver": log_to_driver}
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": dict(env_vars)}
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
        kwargs["_system_config"] = dict(compat.RAY_NO_PRESTART)
        workers_at_driver_niceness()
    with warnings.catch_warnings():
        # Ray's notice that it may stop hiding GPUs from num_gpus=0 actors; it still does,
        # which is what keeps CPU-only actors off a GPU.
        warnings.filterwarnings("ignore", message=".*accelerator visible devices.*")
        if address:
            ray.init(**kwargs)
        else:
            with lean_local_head():
                ray.init(**kwargs)
    return True


def workers_at_driver_niceness() -> None:
    """Make the workers of a Ray head started by this process run at this process's own
    niceness instead of Ray's default 15. The client actors do all of a run's compute; at
    nice 15 any normal-priority process beside them (another job, a test, an editor's
    indexer) takes nearly all the CPU and a run looks hung. An explicit
    ``RAY_worker_niceness`` in the environment wins. The raylet applies it as an
    *increment* to the niceness it inherited from this process, so 0 means "the same as
    the driver". Clusters set it on ``ray start`` (``clusters/README.md``)."""
    os.environ.setdefault(WORKER_NICENESS_ENV, "0")


@contextlib.contextmanager
def lean_local_head() -> Iterator[None]:
    """Wrap the ``ray.init`` that starts a local head. A no-op when opted out or when this
    Ray's ``Node`` lacks the methods (``tests/test_ray_head.py`` then fails)."""
    node_class = None if env_flag(FULL_HEAD_ENV) else compat.ray_node_class()
    if node_class is None:
        yield
        return
    saved = {m: vars(node_class)[m] for m in SKIPPED_METHODS}
    try:
        for m in SKIPPED_METHODS:
            setattr(node_class, m, _skip)
        yield
    finally:
        for m, fn in saved.items():
            setattr(node_class, m, fn)


def _skip(self: object, *args: object, **kwargs: object) -> None:
    return None
