"""The Flower ClientApp, and the per-process cache that makes virtual clients cheap.

A Ray actor process serves many virtual clients. It loads the frozen base generator,
the retriever encoders, the tokenizer and the global knowledge store **once** (in
``ClientRuntime``) and reuses them for every client it serves; a virtual client is only
its partition of the questions, its private knowledge shard (loaded lazily, LRU-cached)
and the adapter state it receives in each message. Replies carry only parameter arrays
and scalar metrics.

The actors are also where the server's model work runs, so the driver never loads a
model (it would be a third copy of torch, transformers and the weights next to the
actors' — and on a cluster, a generator on the head node): an ``evaluate`` message with
``task: prepare`` builds the global index if it is missing and returns the initial
trainable arrays; ``task: evaluate`` scores the global arrays on the server's held-out
questions against the global store. Model code is imported inside the handlers only.

Chaos testing: ``FEDRAG_RAY_FAULTS="raise:3,kill:5@2,nan:1,scale:2×1000"`` makes
partition 3 raise in every round, the actor serving partition 5 exit hard in round 2,
partition 1 reply with NaN and partition 2 scale its update by 1000 (``faults`` lists
them all; used by the tests, and handy to check a deployment's failure tolerance).
Differential privacy and secure aggregation are Flower mods on the train handler
(``privacy.train_mods``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrag_ray.config import ExperimentConfig, config_from_dict
from fedrag_ray.data import (
    Passage,
    QAExample,
    eval_examples,
    load_dataset_from_config,
    partition_examples,
)
from fedrag_ray.federated.faults import ENV_VAR as FAULTS_ENV
from fedrag_ray.federated.faults import Faults, parse_faults
from fedrag_ray.federated.federated_retrieval import (
    ANSWER,
    RETRIEVE,
    answer_reply,
    retrieve_reply,
)
from fedrag_ray.federated.knowledge import (
    ensure_global_store,
    open_client_store,
    open_global_store,
    public_store_path,
)
from fedrag_ray.federated.params import from_record, record_nbytes, to_record
from fedrag_ray.federated.privacy import train_mods
from fedrag_ray.knowledge_store import KnowledgeStore
from fedrag_ray.runtime import configure_process

if TYPE_CHECKING:
    from fedrag_ray.rag import RAGSystem

SHARD_CACHE_SIZE = 32


def client_partitions(cfg: ExperimentConfig, train: list[QAExample]) -> list[list[int]]:
    fed = cfg.federation
    assert fed is not None
    p = fed.partition
    return partition_examples(train, fed.num_clients, p.type, p.alpha, p.field, cfg.seed)


def store_dir(stores_root: str | Path, partition: int | None) -> Path:
    root = Path(stores_root)
    return root / "global" if partition is None else root / "clients" / f"client_{partition:05d}"


def global_store_path(cfg: ExperimentConfig, stores_root: str | Path) -> Path:
    """``knowledge_store.path`` when configured (shared across runs), else the run's own."""
    if cfg.knowledge_store.path:
        return Path(cfg.knowledge_store.path)
    return store_dir(stores_root, None)


@dataclass
class ClientRuntime:
    """Everything an actor process shares across the virtual clients it serves."""

    cfg: ExperimentConfig
    stores_root: Path
    system: RAGSystem
    train: list[QAExample]
    eval: list[QAExample]
    passages: list[Passage]
    partitions: list[list[int]]
    shards: OrderedDict[int, Any] = field(default_factory=OrderedDict)
    global_store: Any = None  # a KnowledgeStore, or a ServedStore (serve: actors)
    public: Any = None  # knowledge: both
    clients_served: set[int] = field(default_factory=set)

    def examples(self, partition: int) -> list[QAExample]:
        return [self.train[i] for i in self.partitions[partition]]

    def prepare_global_store(self) -> int:
        """Before round 1: the global store on disk matches this run, or is built."""
        path = global_store_path(self.cfg, self.stores_root)
        count, built = ensure_global_store(self.system, self.passages, path)
        if built is not None and self.cfg.knowledge_store.serve == "local":
            self.global_store = built
        return count

    def public_store(self) -> Any:
        """``knowledge: both``: the store of passages no client owns (opened once)."""
        if self.public is None:
            self.public = open_global_store(self.system, public_store_path(self.stores_root))
        return self.public

    def global_store_for_server(self) -> Any:
        """The store over all passages (server-side evaluation; clients in ``global``
        knowledge mode): loaded whole, or the shard actors' handle (``serve: actors``)."""
        if self.global_store is None:
            path = global_store_path(self.cfg, self.stores_root)
            self.global_store = open_global_store(self.system, path)
        return self.global_store

    def store_for(self, partition: int) -> KnowledgeStore:
        fed = self.cfg.federation
        assert fed is not None
        if fed.knowledge == "global":
            return self.global_store_for_server()
        if partition in self.shards:
            self.shards.move_to_end(partition)
            return self.shards[partition]
        store = open_client_store(
            self.system, store_dir(self.stores_root, partition), self.public_store
        )
        self.shards[partition] = store
        if len(self.shards) > SHARD_CACHE_SIZE:
            self.shards.popitem(last=False)
        return store


_RUNTIMES: dict[str, ClientRuntime] = {}


def get_runtime(cfg_json: str, stores_root: str) -> ClientRuntime:
    key = cfg_json + stores_root
    runtime = _RUNTIMES.get(key)
    if runtime is None:
        from fedrag_ray.rag import RAGSystem

        cfg = config_from_dict(json.loads(cfg_json))
        assert cfg.federation is not None
        configure_process(threads=max(1, int(cfg.federation.client_resources.num_cpus)))
        data = load_dataset_from_config(cfg.data)
        runtime = ClientRuntime(
            cfg=cfg,
            stores_root=Path(stores_root),
            system=RAGSystem(cfg),
            train=data.train,
            eval=eval_examples(cfg, data),
            passages=data.passages,
            partitions=client_partitions(cfg, data.train),
        )
        _RUNTIMES.clear()  # one experiment per process at a time
        _RUNTIMES[key] = runtime
    return runtime


def node_tag() -> int:
    """The Ray node this actor runs on, as an int (metrics carry numbers, not strings)."""
    try:
        import ray

        return int(ray.get_runtime_context().get_node_id()[:8], 16)
    except Exception:
        return -1


def _parse_faults() -> Faults:
    """The chaos knob, read per message (see ``faults``): raise/kill/nan/shape/scale/signflip."""
    return parse_faults(os.environ.get(FAULTS_ENV, ""))


def make_client_app(cfg_json: str, stores_root: str) -> ClientApp:
    """A ClientApp whose closures hold only two strings (cheap to ship to actors)."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        content = RecordDict({"metrics": MetricRecord({"partition-id": pid})})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def server_task(msg: Message, context: Context) -> Message:
        """Model work on behalf of the server (see the module docstring)."""
        from fedrag_ray.evaluate import evaluate

        config: ConfigRecord = msg.content["config"]
        task = str(config["task"])
        rt = get_runtime(cfg_json, stores_root)
        if task == RETRIEVE:  # federated retrieval at inference (federated_retrieval)
            return retrieve_reply(rt, int(context.node_config["partition-id"]), msg)
        if task == ANSWER:
            return answer_reply(rt, msg)
        if task == "prepare":
            t = time.perf_counter()
            num_passages = rt.prepare_global_store()
            index_seconds = time.perf_counter() - t
            if rt.clients_served:
                raise RuntimeError("prepare must run before any client trains in this actor")
            content = {
                "arrays": to_record(rt.system.trainable_state()),
                "metrics": MetricRecord(
                    {
                        "full-model-bytes": rt.system.full_model_bytes(),
                        "index-seconds": index_seconds,
                        "num-passages": num_passages,
                    }
                ),
            }
            return Message(RecordDict(content), reply_to=msg)
        if task != "evaluate":
            raise ValueError(f"unknown server task {task!r}")
        rt.system.load_trainable_state(from_record(msg.content["arrays"]))
        metrics = evaluate(rt.system, rt.eval, rt.global_store_for_server())
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    @app.train(mods=train_mods(cfg_json))
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        config: ConfigRecord = msg.content["config"]
        server_round = int(config["server-round"])
        faults = _parse_faults()
        if pid in faults.raise_on:
            raise RuntimeError(f"injected fault in partition {pid}")
        if faults.kill_on.get(pid) == server_round:
            os._exit(1)  # simulate a crashed actor process

        from fedrag_ray.methods import local_train

        rt = get_runtime(cfg_json, stores_root)
        fed = rt.cfg.federation
        assert fed is not None
        received = msg.content["arrays"]
        rt.system.load_trainable_state(from_record(received))
        examples = rt.examples(pid)
        # The run's global steps for this client: rounds x local steps (the LR schedule
        # spans the whole run; `both` alternates on the global step).
        per_round = fed.local_steps or fed.local_epochs * math.ceil(
            len(examples) / rt.cfg.train.batch_size
        )
        result = local_train(
            rt.system,
            examples,
            rt.store_for(pid),
            key=(pid, server_round - 1),
            epochs=fed.local_epochs,
            steps=fed.local_steps,
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            start_step=(server_round - 1) * per_round,
            total_steps=fed.rounds * per_round,
        )
        rt.clients_served.add(pid)
        trained = faults.corrupt(pid, rt.system.trainable_state(), from_record(received))
        arrays = to_record(trained)
        metrics = MetricRecord(
            {
                "num-examples": result.num_examples,
                "partition-id": pid,
                "train-loss": result.mean_loss,
                "train-seconds": result.seconds,
                "steps": result.steps,
                "ralt-steps": result.ralt_steps,
                "lsr-steps": result.lsr_steps,
                "bytes-received": record_nbytes(received),
                "bytes-sent": record_nbytes(arrays),
                "actor-pid": os.getpid(),
                "actor-clients-served": len(rt.clients_served),
                "actor-node": node_tag(),
            }
        )
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app
