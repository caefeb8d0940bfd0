"""Before round 1: every Ray node that will run client actors proves it reads the store
root the driver writes to, or the run stops naming the node.

Client actors load their private shards (and the shard actors their slices of the global
index) from paths the driver chose. On a cluster without one shared filesystem, a node
that cannot see them would otherwise show up as a string of "failed clients" in every
round. The driver writes a random token into each directory; a zero-CPU Ray task pinned
to each node reads it back.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import ray

from fedrag_ray.atomic import atomic_write_bytes
from fedrag_ray.config import ClientResources
from fedrag_ray.federated.resources import slots_per_node
from fedrag_ray.knowledge_store import KnowledgeStoreError

TOKEN_FILE = ".fedrag-access-check"
PROBE_TIMEOUT_S = 120.0


@ray.remote(num_cpus=0)
def _read_token(directory: str) -> str:
    try:
        return (Path(directory) / TOKEN_FILE).read_text()
    except OSError as err:
        return f"unreadable: {err.__class__.__name__}: {err}"


def _why(answer: str) -> str:
    return answer if answer.startswith("unreadable") else "it sees another token there"


def client_nodes(resources: ClientResources) -> list[dict[str, Any]]:
    """The alive Ray nodes on which at least one client actor fits."""
    return [
        n
        for n in ray.nodes()
        if n.get("Alive") and n.get("Resources") and slots_per_node(resources, n["Resources"]) > 0
    ]


def check_store_roots(directories: list[Path], resources: ClientResources) -> int:
    """Raise :class:`KnowledgeStoreError` naming every node that cannot read one of
    ``directories``; returns the number of nodes checked."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    tokens = {}
    for d in dict.fromkeys(Path(x).resolve() for x in directories):
        tokens[d] = uuid.uuid4().hex
        atomic_write_bytes(d / TOKEN_FILE, tokens[d].encode())
    nodes = client_nodes(resources)
    probes = [
        (
            node,
            d,
            _read_token.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(d)),
        )
        for node in nodes
        for d in tokens
    ]
    answers = ray.get([p for _, _, p in probes], timeout=PROBE_TIMEOUT_S)
    failures = [
        f"node {node.get('NodeManagerAddress', '?')} (Ray node {node['NodeID'][:12]}) "
        f"cannot read {d} ({_why(answer)})"
        for (node, d, _), answer in zip(probes, answers, strict=True)
        if answer != tokens[d]
    ]
    if failures:
        raise KnowledgeStoreError(
            "store root not readable where clients run: "
            + "; ".join(failures)
            + ". Every node that runs client actors must see the driver's store root at "
            "the same path (a shared filesystem): set federation.shard_dir and "
            "knowledge_store.path to such a path, or run clients only on nodes that have it."
        )
    return len(nodes)
