"""The environment every benchmark process runs in: models from local disk only, no
telemetry, no tokenizer thread pools, unbuffered logs (a killed run keeps its last line)."""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def offline_env() -> None:
    """Set ``OFFLINE_ENV`` where the caller has not chosen otherwise. Call it before the
    first Hugging Face import: ``huggingface_hub`` reads these once, when imported."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
