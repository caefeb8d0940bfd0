"""The RAG system: retriever + knowledge store + generator, and what is trainable in it.

``RAGSystem.answer`` retrieves top-k passages, fills the prompt template and generates,
returning the answer together with the passages it used. ``trainable_state`` /
``load_trainable_state`` expose exactly the parameters the chosen method trains (LoRA
adapters of the generator, the query encoder or its LoRA) as NumPy arrays — the only
thing a federated client ever sends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedrag_ray.config import ExperimentConfig
from fedrag_ray.data import Passage
from fedrag_ray.generator import Generator
from fedrag_ray.knowledge_store import KnowledgeStore
from fedrag_ray.retriever import BiEncoderRetriever


@dataclass
class RagAnswer:
    question: str
    answer: str
    passages: list[Passage]
    scores: list[float]


class RAGSystem:
    def __init__(
        self,
        cfg: ExperimentConfig,
        retriever: BiEncoderRetriever | None = None,
        generator: Generator | None = None,
        store: KnowledgeStore | None = None,
    ) -> None:
        self.cfg = cfg
        rcfg = cfg.retriever
        if cfg.train.method == "ralt" and rcfg.train != "none":
            # RALT never updates the retriever: one encoder copy instead of two.
            rcfg = rcfg.model_copy(update={"train": "none"})
        self.retriever = retriever or BiEncoderRetriever(rcfg, cfg.seed)
        self.generator = generator or Generator(cfg.generator, cfg.seed)
        self.store = store

    # ------------------------------------------------------------------ knowledge

    def build_store(self, passages: list[Passage], show_progress: bool = False) -> KnowledgeStore:
        ks = self.cfg.knowledge_store
        store = KnowledgeStore(
            self.retriever.dim, ks.index, ks.n_shards, ks.nlist, ks.nprobe, ks.hnsw_m, ks.device
        )
        emb = self.retriever.encode_passages([p.text for p in passages], show_progress)
        store.add(passages, emb)
        store.build()
        self.store = store
        return store

    def retrieve(
        self, questions: list[str], k: int, store: KnowledgeStore | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices into the store) of the top-k passages per question."""
        store = store or self.store
        if store is None:
            raise RuntimeError("no knowledge store: call build_store() or load one")
        return store.search(self.retriever.encode_queries(questions), k)

    def prompt(self, question: str, passage: str) -> str:
        return self.cfg.rag.prompt_template.format(passage=passage, question=question)

    def answer(self, question: str, k: int | None = None) -> RagAnswer:
        """Retrieve → prompt (top-k passages as context) → greedy generation."""
        k = k or self.cfg.rag.top_k
        scores, idx = self.retrieve([question], k)
        passages = self.store.get(idx)[0]
        context = "\n".join(p.text for p in passages)
        text = self.generator.generate(
            [self.prompt(question, context)], self.cfg.rag.max_new_tokens
        )
        return RagAnswer(question, text[0], passages, scores[0][: len(passages)].tolist())

    # ------------------------------------------------------------------ trainable state

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """What the configured method updates: RALT the generator's LoRA, LSR the query
        encoder, both of them for RA-DIT."""
        method = self.cfg.train.method
        out: dict[str, torch.nn.Module] = {}
        if method in ("ralt", "both"):
            out["generator"] = self.generator.model
        if method in ("lsr", "both") and self.retriever.trains:
            out["retriever"] = self.retriever.query_encoder
        return out

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {
            f"{prefix}.{name}": p
            for prefix, module in self.trainable_modules().items()
            for name, p in module.named_parameters()
            if p.requires_grad
        }

    def trainable_state(self) -> dict[str, np.ndarray]:
        return {
            k: p.detach().cpu().float().numpy().copy()
            for k, p in self.trainable_parameters().items()
        }

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, np.ndarray]) -> None:
        params = self.trainable_parameters()
        missing = set(params) - set(state)
        unexpected = set(state) - set(params)
        if missing or unexpected:
            raise ValueError(
                f"trainable state mismatch: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )
        for k, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(state[k])).to(p.dtype))

    def full_model_bytes(self) -> int:
        """Bytes of the whole system's weights (generator + query encoder), for ratios."""
        gen = sum(p.numel() * p.element_size() for p in self.generator.model.parameters())
        ret = sum(p.numel() * p.element_size() for p in self.retriever.query_encoder.parameters())
        return int(gen + ret)
