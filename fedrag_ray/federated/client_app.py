"""The Flower ClientApp, and the per-process cache that makes virtual clients cheap.

A Ray actor process serves many virtual clients. It loads the frozen base generator,
the retriever encoders, the tokenizer and the global knowledge store **once** (in
``ClientRuntime``) and reuses them for every client it serves; a virtual client is only
what its train message carries (the adapter state and its question indices, computed
once on the driver: ``sampling``) and its private knowledge shard (loaded lazily, kept in
an LRU bounded by bytes). Replies carry only parameter arrays and scalar metrics. The
message names are ``protocol``'s; ``federation.client_step: noop`` replies without any
model work (engine measurements).

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
from fedrag_ray.data import Passage, QAExample, eval_examples, load_dataset_from_config
from fedrag_ray.federated.faults import ENV_VAR as FAULTS_ENV
from fedrag_ray.federated.faults import Faults, parse_faults
from fedrag_ray.federated.federated_retrieval import answer_reply, retrieve_reply
from fedrag_ray.federated.knowledge import (
    ensure_global_store,
    open_client_store,
    open_global_store,
    public_store_path,
)
from fedrag_ray.federated.params import from_record, record_nbytes, to_record
from fedrag_ray.federated.privacy import train_mods
from fedrag_ray.federated.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EXAMPLE_IDS_KEY,
    FULL_MODEL_BYTES_KEY,
    INDEX_SECONDS_KEY,
    METRICS_KEY,
    NUM_PASSAGES_KEY,
    PARTITION_KEY,
    PROXIMAL_MU_KEY,
    SERVER_ROUND_KEY,
    TASK_ANSWER,
    TASK_EVALUATE,
    TASK_KEY,
    TASK_PREPARE,
    TASK_RETRIEVE,
    TRAIN_LOSS_KEY,
    TRAIN_SECONDS_KEY,
    WEIGHT_KEY,
)
from fedrag_ray.federated.sampling import decode_example_ids
from fedrag_ray.knowledge_store import KnowledgeStore
from fedrag_ray.runtime import configure_process, release_free_memory

if TYPE_CHECKING:
    from fedrag_ray.rag import RAGSystem

# Private shards an actor keeps loaded, by their bytes rather than their number: at 10^4+
# clients an actor serves hundreds of distinct clients per round, and 32 shards (the old
# count) missed on almost every task; a shard is a few passages (~KiBs), so this holds
# every shard an actor sees at 10^4 clients and the most recent ones beyond.
SHARD_CACHE_BYTES = 256 * 2**20


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
    shards: OrderedDict[int, tuple[Any, int]] = field(default_factory=OrderedDict)
    shard_bytes: int = 0
    global_store: Any = None  # a KnowledgeStore, or a ServedStore (serve: actors)
    public: Any = None  # knowledge: both
    clients_served: set[int] = field(default_factory=set)

    def examples(self, ids: list[int]) -> list[QAExample]:
        return [self.train[i] for i in ids]

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

    def store_for(self, partition: int) -> Any:
        fed = self.cfg.federation
        assert fed is not None
        if fed.knowledge == "global":
            return self.global_store_for_server()
        if partition in self.shards:
            self.shards.move_to_end(partition)
            return self.shards[partition][0]
        store = open_client_store(
            self.system, store_dir(self.stores_root, partition), self.public_store
        )
        nbytes = _private_bytes(store, self.public)
        self.shards[partition] = (store, nbytes)
        self.shard_bytes += nbytes
        while self.shard_bytes > SHARD_CACHE_BYTES and len(self.shards) > 1:
            self.shard_bytes -= self.shards.popitem(last=False)[1][1]
        return store


def _private_bytes(store: Any, public: Any) -> int:
    """What caching a client's store costs: its private shard's vectors and text. The
    public store (``knowledge: both``; a client without passages of its own searches only
    it) is held once by the runtime, and a served store holds nothing here."""
    private = getattr(store, "private", store)
    if private is public or not isinstance(private, KnowledgeStore):
        return 0
    return private.embeddings.nbytes + sum(len(p.text) for p in private.passages)


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
        )
        _RUNTIMES.clear()  # one experiment per process at a time
        _RUNTIMES[key] = runtime
    return runtime


def node_tag() -> int:
    """The Ray node this actor runs on, as an int (metrics carry numbers, not strings);
    -1 outside Ray (asking Ray's runtime context there would start a local Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return -1
        return int(ray.get_runtime_context().get_node_id()[:8], 16)
    except Exception:
        return -1


def _parse_faults() -> Faults:
    """The chaos knob, read per message (see ``faults``): raise/kill/nan/shape/scale/signflip."""
    return parse_faults(os.environ.get(FAULTS_ENV, ""))


def make_client_app(cfg_json: str, stores_root: str) -> ClientApp:
    """A ClientApp whose closures hold only two strings (cheap to ship to actors)."""
    fed = config_from_dict(json.loads(cfg_json)).federation
    noop = fed is not None and fed.client_step == "noop"
    app = ClientApp()

    @app.evaluate()
    def server_task(msg: Message, context: Context) -> Message:
        """Model work on behalf of the server (see the module docstring)."""
        from fedrag_ray.evaluate import evaluate_detailed
        from fedrag_ray.stats import join_per_question

        config: ConfigRecord = msg.content[CONFIG_KEY]
        task = str(config[TASK_KEY])
        rt = get_runtime(cfg_json, stores_root)
        if task == TASK_RETRIEVE:  # federated retrieval at inference (federated_retrieval)
            return retrieve_reply(rt, int(context.node_config[PARTITION_KEY]), msg)
        if task == TASK_ANSWER:
            return answer_reply(rt, msg)
        if task == TASK_PREPARE:
            t = time.perf_counter()
            num_passages = rt.prepare_global_store()
            index_seconds = time.perf_counter() - t
            if rt.clients_served:
                raise RuntimeError("prepare must run before any client trains in this actor")
            release_free_memory()  # the index build's buffers
            content = {
                ARRAYS_KEY: to_record(rt.system.trainable_state()),
                METRICS_KEY: MetricRecord(
                    {
                        FULL_MODEL_BYTES_KEY: rt.system.full_model_bytes(),
                        INDEX_SECONDS_KEY: index_seconds,
                        NUM_PASSAGES_KEY: num_passages,
                    }
                ),
            }
            return Message(RecordDict(content), reply_to=msg)
        if task != TASK_EVALUATE:
            raise ValueError(f"unknown server task {task!r}")
        rt.system.load_trainable_state(from_record(msg.content[ARRAYS_KEY]))
        ev = evaluate_detailed(rt.system, rt.eval, rt.global_store_for_server())
        release_free_memory()
        # per-question scores travel too: the server pairs the first and the last
        # evaluation of the same questions for the gain's interval
        record = MetricRecord(join_per_question(ev.metrics, ev.per_question))
        return Message(RecordDict({METRICS_KEY: record}), reply_to=msg)

    @app.train(mods=train_mods(cfg_json))
    def train(msg: Message, context: Context) -> Message:
        t0 = time.perf_counter()
        pid = int(context.node_config[PARTITION_KEY])
        config: ConfigRecord = msg.content[CONFIG_KEY]
        server_round = int(config[SERVER_ROUND_KEY])
        if EXAMPLE_IDS_KEY not in config:
            raise ValueError(f"train message without {EXAMPLE_IDS_KEY!r} (see protocol.py)")
        ids = decode_example_ids(config[EXAMPLE_IDS_KEY])
        faults = _parse_faults()
        if pid in faults.raise_on:
            raise RuntimeError(f"injected fault in partition {pid}")
        if faults.kill_on.get(pid) == server_round:
            os._exit(1)  # simulate a crashed actor process
        received = msg.content[ARRAYS_KEY]
        if noop:  # engine measurements: no model work, the arrays go back as they came
            metrics = MetricRecord(
                {
                    WEIGHT_KEY: len(ids),
                    PARTITION_KEY: pid,
                    TRAIN_LOSS_KEY: 0.0,
                    TRAIN_SECONDS_KEY: time.perf_counter() - t0,
                    "actor-pid": os.getpid(),
                }
            )
            return Message(RecordDict({ARRAYS_KEY: received, METRICS_KEY: metrics}), reply_to=msg)

        from fedrag_ray.methods import local_train

        rt = get_runtime(cfg_json, stores_root)
        fed = rt.cfg.federation
        assert fed is not None
        rt.system.load_trainable_state(from_record(received))
        examples = rt.examples(ids)
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
            proximal_mu=float(config.get(PROXIMAL_MU_KEY, 0.0)),
            start_step=(server_round - 1) * per_round,
            total_steps=fed.rounds * per_round,
        )
        rt.clients_served.add(pid)
        release_free_memory()
        trained = faults.corrupt(pid, rt.system.trainable_state(), from_record(received))
        arrays = to_record(trained)
        metrics = MetricRecord(
            {
                WEIGHT_KEY: result.num_examples,
                PARTITION_KEY: pid,
                TRAIN_LOSS_KEY: result.mean_loss,
                TRAIN_SECONDS_KEY: result.seconds,
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
        return Message(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics}), reply_to=msg)

    return app
