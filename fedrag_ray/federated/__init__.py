"""Federated RAG fine-tuning on Flower's Ray simulation backend."""

from typing import Any

__all__ = ["FederatedSession", "run_federated"]


def __getattr__(name: str) -> Any:
    """``run_federated`` / ``FederatedSession`` imported on first use (PEP 562): the light
    submodules (checkpoint, partitions) are read by the CLI's checks, which must not pay
    seconds for Flower and Ray."""
    if name in __all__:
        from fedrag_ray.federated import simulation

        return getattr(simulation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
