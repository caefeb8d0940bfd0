"""Mapping client resources onto a Ray cluster, and failing fast when they cannot fit.

Ray would otherwise leave an unschedulable actor pending forever; Flower's simulation
then waits in round 1 with no message. We compute the parallel client slots per node up
front and raise a :class:`ResourceError` naming the resource that no node can provide.
"""

from __future__ import annotations

import math
from typing import Any

from fedrag_ray.config import ClientResources


class ResourceError(RuntimeError):
    pass


def ray_client_resources(res: ClientResources) -> dict[str, Any]:
    """Keyword arguments for ``ActorClass.options`` (custom resources under ``resources``)."""
    out: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.custom:
        out["resources"] = dict(res.custom)
    return out


def _requests(res: ClientResources) -> dict[str, float]:
    req = {"CPU": res.num_cpus}
    if res.num_gpus > 0:
        req["GPU"] = res.num_gpus
    req.update(res.custom)
    return req


def slots_per_node(res: ClientResources, node_resources: dict[str, float]) -> int:
    return min(
        math.floor(node_resources.get(name, 0.0) / amount + 1e-9)
        for name, amount in _requests(res).items()
        if amount > 0
    )


def cluster_client_slots(res: ClientResources, nodes: list[dict[str, Any]] | None = None) -> int:
    """How many client actors can run at once on the alive nodes; raises if none can."""
    if nodes is None:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive", True) and n.get("Resources")]
    slots = sum(slots_per_node(res, n["Resources"]) for n in nodes)
    if slots == 0:
        totals: dict[str, float] = {}
        biggest: dict[str, float] = {}
        for n in nodes:
            for k, v in n["Resources"].items():
                totals[k] = totals.get(k, 0.0) + v
                biggest[k] = max(biggest.get(k, 0.0), v)
        short = [
            f"{name}={amount:g} (largest node has {biggest.get(name, 0.0):g}, "
            f"cluster total {totals.get(name, 0.0):g})"
            for name, amount in _requests(res).items()
            if amount > biggest.get(name, 0.0)
        ] or ["the combination of " + ", ".join(f"{k}={v:g}" for k, v in _requests(res).items())]
        raise ResourceError(
            "federation.client_resources cannot be satisfied by any node of this Ray "
            f"cluster: each client asks for {'; '.join(short)}. Lower the request or add "
            "nodes that provide it."
        )
    return slots
