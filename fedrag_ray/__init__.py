"""fedrag_ray: fine-tune RAG systems (generator, retriever or both) centrally or across
federated clients, simulated at scale with Flower on Ray, swept with Ray Tune."""

import logging

# bitsandbytes' CPU backend warns at import that an optional hub-downloaded kernel is
# missing and then uses its built-in one; the warning is noise on every CPU machine.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from fedrag_ray.centralized import run_centralized
from fedrag_ray.config import ConfigError, ExperimentConfig, config_from_dict, load_config
from fedrag_ray.data import (
    DataError,
    Passage,
    QAExample,
    RagDataset,
    load_corpus_rows,
    load_dataset_from_config,
    load_pubmedqa,
    load_qa_rows,
    partition_examples,
)
from fedrag_ray.evaluate import evaluate, exact_match, mean_reciprocal_rank, recall_at_k, token_f1
from fedrag_ray.generator import Generator
from fedrag_ray.knowledge_store import KnowledgeStore, KnowledgeStoreError
from fedrag_ray.methods import local_train, lsr_loss, ralt_loss
from fedrag_ray.rag import RagAnswer, RAGSystem
from fedrag_ray.retriever import BiEncoderRetriever

__version__ = "0.1.0"


def run_federated(*args, **kwargs):  # noqa: ANN002, ANN003 - lazy: Flower/Ray import cost
    """See :func:`fedrag_ray.federated.simulation.run_federated`."""
    from fedrag_ray.federated.simulation import run_federated as _run

    return _run(*args, **kwargs)


__all__ = [
    "BiEncoderRetriever",
    "ConfigError",
    "DataError",
    "ExperimentConfig",
    "Generator",
    "KnowledgeStore",
    "KnowledgeStoreError",
    "Passage",
    "QAExample",
    "RAGSystem",
    "RagAnswer",
    "RagDataset",
    "config_from_dict",
    "evaluate",
    "exact_match",
    "load_config",
    "load_corpus_rows",
    "load_dataset_from_config",
    "load_pubmedqa",
    "load_qa_rows",
    "local_train",
    "lsr_loss",
    "mean_reciprocal_rank",
    "partition_examples",
    "ralt_loss",
    "recall_at_k",
    "run_centralized",
    "run_federated",
    "token_f1",
    "__version__",
]
