"""What a Ray actor process shares across the virtual clients it serves.

A Ray actor process serves many virtual clients. It loads the frozen base generator,
the retriever encoders, the tokenizer and the global knowledge store **once** (in
:class:`ClientRuntime`) and reuses them for every client it serves; a virtual client is
only what its train message carries (the adapter state and its question indices,
computed once on the driver: ``sampling``) and its private knowledge shard (loaded
lazily, kept in an LRU bounded by bytes). Also where the stores of a run live on disk
(:func:`store_dir`, :func:`global_store_path`), which the driver needs too.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrag_ray.config import ExperimentConfig, config_from_dict
from fedrag_ray.data import Passage, QAExample, eval_examples, load_dataset_from_config
from fedrag_ray.federated.knowledge import (
    ensure_global_store,
    open_client_store,
    open_global_store,
    public_store_path,
)
from fedrag_ray.knowledge_store import KnowledgeStore
from fedrag_ray.runtime import configure_process

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
    run_id: str  # names this run's shard actors (serve: actors; index_service)
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
            self.public = open_global_store(
                self.system, public_store_path(self.stores_root), self.run_id
            )
        return self.public

    def global_store_for_server(self) -> Any:
        """The store over all passages (server-side evaluation; clients in ``global``
        knowledge mode): loaded whole, or the shard actors' handle (``serve: actors``)."""
        if self.global_store is None:
            path = global_store_path(self.cfg, self.stores_root)
            self.global_store = open_global_store(self.system, path, self.run_id)
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


def get_runtime(cfg_json: str, stores_root: str, run_id: str = "") -> ClientRuntime:
    key = "\n".join((cfg_json, stores_root, run_id))
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
            run_id=run_id,
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
