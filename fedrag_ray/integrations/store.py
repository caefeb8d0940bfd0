"""Other libraries' documents into a fedrag_ray knowledge store (shared by the bridges)."""

from __future__ import annotations

import json
from typing import Any

from fedrag_ray.data import Passage
from fedrag_ray.knowledge_store import KnowledgeStore


def jsonable(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata a store can save: JSON values kept, anything else as its string."""
    out = {}
    for k, v in metadata.items():
        try:
            json.dumps(v)
            out[str(k)] = v
        except (TypeError, ValueError):
            out[str(k)] = str(v)
    return out


def check_passages(passages: list[Passage], where: str) -> list[Passage]:
    """Empty texts and duplicate ids are refused, naming the offending document."""
    if not passages:
        raise ValueError(f"{where}: no documents")
    seen: set[str] = set()
    for i, p in enumerate(passages):
        if not p.text.strip():
            raise ValueError(f"{where}: document {i} (id {p.id!r}) has no text")
        if p.id in seen:
            raise ValueError(f"{where}: duplicate document id {p.id!r} (document {i})")
        seen.add(p.id)
    return passages


def passages_to_store(
    system: Any, passages: list[Passage], store: KnowledgeStore | None = None
) -> KnowledgeStore:
    """Embed ``passages`` with the system's (frozen) passage encoder into ``store``, or
    into a new store built as the config says, which becomes the system's store."""
    if store is None:
        return system.build_store(passages)
    known = {p.id for p in store.passages}
    clash = next((p.id for p in passages if p.id in known), None)
    if clash is not None:
        raise ValueError(f"document id {clash!r} is already in the knowledge store")
    store.add(passages, system.retriever.encode_passages([p.text for p in passages]))
    store.build()
    return store
