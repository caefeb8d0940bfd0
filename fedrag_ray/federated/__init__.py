"""Federated RAG fine-tuning on Flower's Ray simulation backend."""

from fedrag_ray.federated.simulation import run_federated

__all__ = ["run_federated"]
