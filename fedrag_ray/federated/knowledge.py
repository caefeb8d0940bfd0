"""The global store as a client actor sees it: checked on disk before round 1, then
either loaded whole (``knowledge_store.serve: local``) or reached through the shard
actors the driver started (``serve: actors``, ``index_service``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrag_ray.data import Passage
from fedrag_ray.knowledge_store import MANIFEST, KnowledgeStore
from fedrag_ray.provenance import ensure_store, store_provenance

if TYPE_CHECKING:
    from fedrag_ray.rag import RAGSystem


def public_store_path(stores_root: str | Path) -> Path:
    """``knowledge: both``: the passages no client owns, searched next to every shard."""
    return Path(stores_root) / "public"


def ensure_global_store(
    system: RAGSystem, passages: list[Passage], path: Path
) -> tuple[int, KnowledgeStore | None]:
    """Make sure the store at ``path`` exists and was built from these passages, this
    encoder and these index settings (only its manifest is read), else build and save
    it. Returns (passage count, the store if it was built here)."""
    expected = store_provenance(system.retriever, passages, system.cfg.knowledge_store)
    return ensure_store(
        path,
        expected,
        lambda: system.build_store(passages),
        "delete it (or point knowledge_store.path / federation.shard_dir elsewhere) to rebuild it",
    )


def open_global_store(system: RAGSystem, path: Path, run_id: str = "") -> Any:
    """The searchable global (or public) store: a handle on the shard actors that run
    ``run_id`` started to serve it, or the whole store loaded here."""
    if system.cfg.knowledge_store.serve == "actors":
        from fedrag_ray.index_service import ServedStore, service_name

        return ServedStore.connect(service_name(path, run_id))
    return KnowledgeStore.load(path, system.retriever.dim)


def open_client_store(system: RAGSystem, shard: Path, public: Any) -> Any:
    """What client ``shard`` searches: its private shard; with ``knowledge: both`` the
    public store too (``public``: a zero-argument function that opens it), merged."""
    private = (
        KnowledgeStore.load(shard, system.retriever.dim) if (shard / MANIFEST).exists() else None
    )
    fed = system.cfg.federation
    if fed is None or fed.knowledge != "both":
        if private is None:
            raise FileNotFoundError(f"{shard}: no private shard for this client")
        return private
    from fedrag_ray.combined_store import CombinedStore

    return public() if private is None else CombinedStore(public(), private)
