"""Federated RAG fine-tuning on Flower's Ray simulation backend."""

from fedrag_ray.federated.simulation import FederatedSession, run_federated

__all__ = ["FederatedSession", "run_federated"]
