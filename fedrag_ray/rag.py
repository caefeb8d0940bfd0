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
from fedrag_ray.progress import ProgressFn
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
        from fedrag_ray.generator import resolve_device

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        rcfg = cfg.retriever
        if cfg.train.method == "ralt" and rcfg.train != "none":
            # RALT never updates the retriever: one encoder copy instead of two.
            rcfg = rcfg.model_copy(update={"train": "none"})
        self.retriever = retriever or BiEncoderRetriever(rcfg, cfg.seed, self.device)
        self.generator = generator or Generator(cfg.generator, cfg.seed, self.device)
        self.store = store

    # ------------------------------------------------------------------ knowledge

    def build_store(
        self, passages: list[Passage], show_progress: bool | ProgressFn = False
    ) -> KnowledgeStore:
        """Embed ``passages`` and index them; ``show_progress``: a tqdm bar (True) or a
        ``progress(stage, done, total)`` callback per batch."""
        from fedrag_ray.provenance import store_provenance

        ks = self.cfg.knowledge_store
        store = KnowledgeStore.from_config(self.retriever.dim, ks)
        emb = self.retriever.encode_passages([p.text for p in passages], show_progress)
        store.add(passages, emb)
        store.provenance = store_provenance(self.retriever, passages, ks)
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

    def prompt(self, question: str, passages: str | list[str] | None, reserve: int = 8) -> str:
        """The prompt for ``question`` with ``passages`` (rank order) fitted by
        :meth:`fit_passages`, wrapped in the chat template if enabled."""
        return self._render(question, self.fit_passages(question, passages, reserve))

    def _render(self, question: str, kept: list[str]) -> str:
        template = self.cfg.rag.prompt_template
        return self.generator.format_prompt(
            template.format(passage="\n".join(kept), question=question)
        )

    def fit_passages(
        self, question: str, passages: str | list[str] | None, reserve: int = 8
    ) -> list[str]:
        """The one context policy (training, evaluation, ``ask``): passages in rank order
        fill the template's ``{passage}`` until the prompt plus ``reserve`` answer tokens
        would exceed ``generator.max_length``; the passage that overflows is cut to fit
        and lower-ranked ones are dropped, so the lowest-ranked text goes first and the
        question is never cut. Returns the passage texts that go in."""
        gen = self.generator
        template = self.cfg.rag.prompt_template
        if isinstance(passages, str):
            passages = [passages]
        passages = [p for p in (passages or []) if p]
        empty = gen.format_prompt(template.format(passage="", question=question))
        # 2 tokens of slack: a seam between passage and template may tokenize differently
        budget = (
            self.cfg.generator.max_length
            - reserve
            - gen.count_tokens(empty)
            - len(gen.prefix_ids)
            - 2
        )
        kept: list[str] = []
        for text in passages:
            sep = 1 if kept else 0  # the "\n" between passages
            need = gen.count_tokens(text) + sep
            if need <= budget:
                kept.append(text)
                budget -= need
                continue
            cut = gen.truncate_tokens(text, budget - sep)
            if cut:
                kept.append(cut)
            break
        return kept

    def answer_reserve(self, answer: str) -> int:
        """Tokens to keep free for ``answer`` (and its end-of-turn) when fitting a prompt."""
        return min(self.generator.count_tokens(answer) + 2, self.cfg.generator.max_length // 2)

    @torch.no_grad()
    def answer(self, question: str, k: int | None = None) -> RagAnswer:
        """Retrieve → prompt (the top ``rag.generate_passages`` within the length budget)
        → greedy generation; returns the passages that were actually in the prompt."""
        k = k or self.cfg.rag.generate_passages
        scores, idx = self.retrieve([question], k)
        valid = idx[0] >= 0
        passages = self.store.get(idx[:, valid])[0]
        reserve = self.cfg.rag.max_new_tokens
        kept = self.fit_passages(question, [p.text for p in passages], reserve)
        used = passages[: len(kept)]
        text = self.generator.generate([self._render(question, kept)], reserve)
        return RagAnswer(question, text[0], used, scores[0][valid][: len(used)].tolist())

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
        gen = self.generator.weight_bytes()
        ret = sum(p.numel() * p.element_size() for p in self.retriever.query_encoder.parameters())
        return int(gen + ret)
