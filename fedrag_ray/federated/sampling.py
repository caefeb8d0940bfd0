"""Which clients train in a round, decided in one place.

Clients are drawn by *partition id* (stable across runs; Flower's node ids are random
per run) from a generator seeded by ``(seed, round)``, so a resumed run trains the same
clients as an uninterrupted one with no RNG state in the checkpoint. The partition ↔
node mapping is the one the simulation engine registered (``ray_backend.SimulationNodes``),
not discovered by messaging every node.

Flower's strategies build the round's messages (they add their own config, e.g.
FedProx's ``proximal-mu`` and the DP wrappers' clipping norm) and sample nodes from
``grid.get_node_ids()`` with Python's global ``random``. They are handed
:class:`RoundNodes`, which lists exactly the sampled nodes, so their draw is only an
order, and the messages are put back in partition order: nothing depends on the global
RNG. Each message then gets its client's question indices (``protocol.EXAMPLE_IDS_KEY``),
so client actors never compute partitions; the arrays record stays shared by all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedrag_ray.config import ExperimentConfig
from fedrag_ray.data import QAExample, partition_examples
from fedrag_ray.federated.protocol import CONFIG_KEY, EXAMPLE_IDS_KEY, LOCAL_STEPS_KEY


def client_partitions(cfg: ExperimentConfig, train: Sequence[QAExample]) -> list[list[int]]:
    """Each client's question indices into ``train``: computed once per run, on the
    driver (O(n log n), ``data.partition_examples``)."""
    fed = cfg.federation
    assert fed is not None
    p = fed.partition
    return partition_examples(train, fed.num_clients, p.type, p.alpha, p.field, cfg.seed)


class RoundNodes:
    """The one Grid call a Flower strategy's ``configure_train`` makes, answered with
    this round's sampled nodes."""

    def __init__(self, node_ids: Sequence[int]) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def encode_example_ids(ids: Sequence[int]) -> bytes:
    """Question indices as int64 bytes: a plain scalar in both Message and legacy
    (SecAgg+ FitIns) configs, 8 bytes per question."""
    return np.asarray(ids, dtype=np.int64).tobytes()


def decode_example_ids(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype=np.int64).tolist()


class ClientSampler:
    """The round's partitions, their nodes, and the train messages for them."""

    def __init__(
        self,
        seed: int,
        per_round: int,
        partitions: Sequence[Sequence[int]],
        partition_to_node: dict[int, int],
        local_steps: np.ndarray | None = None,
    ) -> None:
        """``local_steps``: per partition, the local steps its tier sets (0: the
        federation's), sent in its train message (``clock.SimClock``)."""
        self.seed = seed
        self.local_steps = local_steps
        self.per_round = per_round
        self.partitions = partitions
        self.partition_to_node = partition_to_node
        self.node_to_partition = {n: p for p, n in partition_to_node.items()}

    def sample(
        self, server_round: int, size: int | None = None, allowed: np.ndarray | None = None
    ) -> list[int]:
        """Sorted partition ids of the round (the same for every run with this seed):
        ``size`` of them (default ``per_round``), drawn among the ``allowed`` ones (a
        mask by partition: the available clients; all when None, or when all are
        allowed, so the draw is then exactly the one without a mask); fewer when fewer
        are allowed."""
        rng = np.random.default_rng([self.seed, server_round])
        size = self.per_round if size is None else size
        if allowed is None or allowed.all():
            chosen = rng.choice(len(self.partitions), size=size, replace=False)
        else:
            candidates = np.flatnonzero(allowed)
            chosen = rng.choice(candidates, size=min(size, candidates.size), replace=False)
        return sorted(int(c) for c in chosen if int(c) in self.partition_to_node)

    def train_messages(
        self,
        strategy: Any,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        pids: Sequence[int] | None = None,
    ) -> list[Message]:
        """The strategy's train messages for the round's clients (``pids``, else the
        round's sample), in partition order, each with its client's question indices
        (and its tier's local steps, when set)."""
        pids = self.sample(server_round) if pids is None else pids
        nodes = RoundNodes([self.partition_to_node[p] for p in pids])
        messages = list(strategy.configure_train(server_round, arrays, config, nodes))
        messages.sort(key=lambda m: self.node_to_partition[m.metadata.dst_node_id])
        for m in messages:
            pid = self.node_to_partition[m.metadata.dst_node_id]
            content = RecordDict(dict(m.content.items()))  # the arrays record stays shared
            own = dict(m.content[CONFIG_KEY])
            own[EXAMPLE_IDS_KEY] = encode_example_ids(self.partitions[pid])
            if self.local_steps is not None and self.local_steps[pid] > 0:
                own[LOCAL_STEPS_KEY] = int(self.local_steps[pid])
            content[CONFIG_KEY] = ConfigRecord(own)
            m.content = content
        return messages
