"""fedrag_ray: fine-tune RAG systems (generator, retriever or both) centrally or across
federated clients, simulated at scale with Flower on Ray, swept with Ray Tune."""

import logging

# bitsandbytes' CPU backend warns at import that an optional hub-downloaded kernel is
# missing and then uses its built-in one; the warning is noise on every CPU machine.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# Public API, imported lazily (PEP 562): `import fedrag_ray.knowledge_store` or the CLI's
# error paths should not pay for torch, transformers and Flower up front.
_EXPORTS = {
    "run_centralized": "fedrag_ray.centralized",
    "ConfigError": "fedrag_ray.config",
    "ExperimentConfig": "fedrag_ray.config",
    "config_from_dict": "fedrag_ray.config",
    "load_config": "fedrag_ray.config",
    "DataError": "fedrag_ray.data",
    "Passage": "fedrag_ray.data",
    "QAExample": "fedrag_ray.data",
    "RagDataset": "fedrag_ray.data",
    "load_corpus_rows": "fedrag_ray.data",
    "load_dataset_from_config": "fedrag_ray.data",
    "load_pubmedqa": "fedrag_ray.data",
    "load_qa_rows": "fedrag_ray.data",
    "partition_examples": "fedrag_ray.data",
    "evaluate": "fedrag_ray.evaluate",
    "exact_match": "fedrag_ray.evaluate",
    "mean_reciprocal_rank": "fedrag_ray.evaluate",
    "recall_at_k": "fedrag_ray.evaluate",
    "token_f1": "fedrag_ray.evaluate",
    "ExportError": "fedrag_ray.export",
    "export_run": "fedrag_ray.export",
    "load_run": "fedrag_ray.export",
    "Generator": "fedrag_ray.generator",
    "ServedStore": "fedrag_ray.index_service",
    "CombinedStore": "fedrag_ray.combined_store",
    "merge_by_score": "fedrag_ray.fusion",
    "reciprocal_rank_fusion": "fedrag_ray.fusion",
    "write_store": "fedrag_ray.knowledge_store",
    "run_federated_retrieval": "fedrag_ray.federated.federated_retrieval",
    "KnowledgeStore": "fedrag_ray.knowledge_store",
    "KnowledgeStoreError": "fedrag_ray.knowledge_store",
    "local_train": "fedrag_ray.methods",
    "lsr_loss": "fedrag_ray.methods",
    "ralt_loss": "fedrag_ray.methods",
    "RagAnswer": "fedrag_ray.rag",
    "RAGSystem": "fedrag_ray.rag",
    "BiEncoderRetriever": "fedrag_ray.retriever",
    "TextEncoder": "fedrag_ray.text_encoder",
    "run_federated": "fedrag_ray.federated.simulation",
    "run_sweep": "fedrag_ray.tune",
    "Answerer": "fedrag_ray.service",
    "preflight": "fedrag_ray.preflight",
    "ProgressFn": "fedrag_ray.progress",
}

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedrag_ray' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "Answerer",
    "BiEncoderRetriever",
    "CombinedStore",
    "ConfigError",
    "DataError",
    "ExperimentConfig",
    "ExportError",
    "Generator",
    "KnowledgeStore",
    "KnowledgeStoreError",
    "Passage",
    "ProgressFn",
    "QAExample",
    "RAGSystem",
    "RagAnswer",
    "RagDataset",
    "ServedStore",
    "TextEncoder",
    "config_from_dict",
    "evaluate",
    "exact_match",
    "export_run",
    "load_config",
    "load_corpus_rows",
    "load_dataset_from_config",
    "load_pubmedqa",
    "load_qa_rows",
    "load_run",
    "local_train",
    "lsr_loss",
    "mean_reciprocal_rank",
    "merge_by_score",
    "partition_examples",
    "preflight",
    "ralt_loss",
    "recall_at_k",
    "reciprocal_rank_fusion",
    "run_centralized",
    "run_federated",
    "run_federated_retrieval",
    "run_sweep",
    "token_f1",
    "write_store",
    "__version__",
]
