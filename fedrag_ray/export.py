"""Export a fine-tuned run into formats other tools load: the generator's LoRA as a PEFT
adapter (optionally merged into a full Hugging Face model), the query encoder as a
sentence-transformers directory, and the knowledge store.

Why: a run's result is ``trainable_state.npz``, arrays keyed by fedrag_ray's own parameter
names; plain transformers / peft / vLLM / sentence-transformers cannot read it.

A run directory is any of:

- a centralized run (``fedrag-ray train -o DIR``),
- a federated run (``fedrag-ray simulate -o DIR``): the global model after the last round,
  or after a chosen round when the run kept them (``tracking.keep_rounds: true`` writes
  ``DIR/rounds/round_NNNN.npz``),
- a sweep (``fedrag-ray tune -o DIR``): the best trial (or a named one).

Layout of the export directory (written atomically, as one directory)::

    generator/          PEFT adapter: adapter_config.json, adapter_model.safetensors, tokenizer
    generator-merged/   (merge=True) the base model with the LoRA merged in, + tokenizer
    query_encoder/      sentence-transformers directory (full weights, LoRA merged)
    passage_encoder/    sentence-transformers directory, only when it differs from the query
                        encoder (the store's vectors came from it; embed new passages with it)
    knowledge_store/    fedrag_ray KnowledgeStore (passages, vectors, FAISS index)
    fedrag_export.json  what was exported from where, the base model, the prompt settings
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrag_ray.atomic import atomic_directory
from fedrag_ray.config import ExperimentConfig, config_from_dict

EXPORT_MANIFEST = "fedrag_export.json"
EXPORT_FORMAT_VERSION = 1
ROUNDS_DIR = "rounds"


class ExportError(ValueError):
    """A run directory that cannot be exported (missing files, unknown round...)."""


@dataclass
class RunSource:
    """The run a model comes from: its directory, config and trained arrays."""

    run_dir: Path
    cfg: ExperimentConfig
    state: dict[str, np.ndarray]
    kind: str  # centralized | federated | tune
    round: int | None = None  # federated: the round whose global model this is
    trial: str | None = None  # tune: the trial directory name


def round_state_path(run_dir: str | Path, server_round: int) -> Path:
    """Where a federated run keeps round ``server_round``'s global arrays (opt-in)."""
    return Path(run_dir) / ROUNDS_DIR / f"round_{server_round:04d}.npz"


def kept_rounds(run_dir: str | Path) -> list[int]:
    return sorted(
        int(p.stem.split("_")[1]) for p in (Path(run_dir) / ROUNDS_DIR).glob("round_*.npz")
    )


def checkpoint_arrays(run_dir: str | Path) -> tuple[int, dict[str, np.ndarray]]:
    """(round, arrays) of the run's last complete checkpoint (any experiment config)."""
    from fedrag_ray.federated.checkpoint import CheckpointError, load_checkpoint

    path = Path(run_dir) / "checkpoint"
    if not (path / "meta.json").exists():
        raise ExportError(f"{run_dir}: no complete checkpoint ({path / 'meta.json'} missing)")
    try:
        ckpt = load_checkpoint(run_dir)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    return int(ckpt.round), dict(ckpt.arrays)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as err:
        raise ExportError(f"{path}: not a readable trainable state ({err})") from None


def _tune_trial_dir(sweep_dir: Path, trial: str | None) -> tuple[Path, str]:
    summary = json.loads((sweep_dir / "tune_results.json").read_text())
    if trial is None:
        best = summary.get("best")
        if not best:
            raise ExportError(
                f"{sweep_dir}/tune_results.json: the sweep has no best trial (all failed?)"
            )
        trial = str(best["trial"])
    names = [str(t["trial"]) for t in summary.get("trials", [])]
    if trial not in names:
        raise ExportError(f"{sweep_dir}: no trial {trial!r} (trials: {', '.join(names)})")
    run = sweep_dir / "sweep" / trial / "run"
    if not (run / "results.json").exists():
        raise ExportError(f"{run}: trial {trial} wrote no results.json")
    return run, trial


def resolve_run(
    run_dir: str | Path, server_round: int | None = None, trial: str | None = None
) -> RunSource:
    """Find the config and trained arrays of a centralized, federated or sweep run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run directory not found: {run_dir}")
    kind = None
    if (run_dir / "tune_results.json").exists():
        run_dir, trial = _tune_trial_dir(run_dir, trial)
        kind = "tune"
    elif trial is not None:
        raise ExportError(f"--trial: {run_dir} is not a sweep (no tune_results.json)")
    results_path = run_dir / "results.json"
    if not results_path.exists():
        raise ExportError(f"{run_dir}: no results.json (not a fedrag-ray run directory)")
    results = json.loads(results_path.read_text())
    if "config" not in results:
        raise ExportError(f"{results_path}: no 'config' field")
    cfg = config_from_dict(results["config"], source=str(results_path))
    federated = results.get("mode") == "federated"
    kind = kind or ("federated" if federated else "centralized")
    if server_round is not None and not federated:
        raise ExportError(f"--round: {run_dir} is a centralized run (rounds are federated)")

    state_path = run_dir / "trainable_state.npz"
    chosen: int | None = None
    if server_round is None:
        if state_path.exists():
            state = _read_npz(state_path)
            chosen = int(results["rounds"]) if federated and results.get("rounds") else None
        elif federated:
            chosen, state = checkpoint_arrays(run_dir)
        else:
            raise ExportError(f"{run_dir}: trainable_state.npz missing")
    else:
        kept = round_state_path(run_dir, server_round)
        if kept.exists():
            state = _read_npz(kept)
        elif (run_dir / "checkpoint" / "meta.json").exists() and (
            checkpoint_arrays(run_dir)[0] == server_round
        ):
            state = checkpoint_arrays(run_dir)[1]
        else:
            have = kept_rounds(run_dir)
            raise ExportError(
                f"--round {server_round}: {run_dir} kept no global model of that round "
                f"(kept: {have or 'none'}; the checkpoint holds the last round only). Rerun "
                "with --set tracking.keep_rounds=true to keep every round"
            )
        chosen = server_round
    return RunSource(run_dir, cfg, state, kind, chosen, trial)


# --------------------------------------------------------------------------- loading


def _split_state(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], ...]:
    gen = {k[len("generator.") :]: v for k, v in state.items() if k.startswith("generator.")}
    ret = {k[len("retriever.") :]: v for k, v in state.items() if k.startswith("retriever.")}
    other = sorted(set(state) - {f"generator.{k}" for k in gen} - {f"retriever.{k}" for k in ret})
    if other:
        raise ExportError(f"trainable state has unknown keys {other[:3]}")
    return gen, ret


def _load_params(module: Any, arrays: dict[str, np.ndarray], what: str) -> None:
    """Copy ``arrays`` into ``module``'s trainable parameters, names checked both ways."""
    import torch

    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = set(params) - set(arrays), set(arrays) - set(params)
    if missing or unexpected:
        raise ExportError(
            f"{what}: trainable state does not match the model built from the run's config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(arrays[name])).to(p.dtype))


def load_generator(source: RunSource) -> Any:
    """fedrag_ray's Generator (full precision, CPU) with the run's LoRA loaded."""
    from fedrag_ray.generator import Generator

    gcfg = source.cfg.generator.model_copy(update={"quantization": "none", "autocast": "none"})
    gen = Generator(gcfg, source.cfg.seed, "cpu")
    arrays, _ = _split_state(source.state)
    _load_params(gen.model, arrays, "generator")
    gen.model.eval()
    return gen


def load_retriever(source: RunSource) -> Any:
    """The run's bi-encoder (CPU) with the trained query encoder loaded, if it trained."""
    from fedrag_ray.retriever import BiEncoderRetriever

    _, arrays = _split_state(source.state)
    rcfg = source.cfg.retriever
    if not arrays:
        rcfg = rcfg.model_copy(update={"train": "none"})
    retriever = BiEncoderRetriever(rcfg, source.cfg.seed, "cpu")
    if arrays:
        _load_params(retriever.query_encoder, arrays, "retriever")
    return retriever


def run_store_path(source: RunSource) -> Path | None:
    """The saved knowledge store the run searched, if one is on disk."""
    cfg = source.cfg
    if cfg.knowledge_store.path and Path(cfg.knowledge_store.path, "manifest.json").exists():
        return Path(cfg.knowledge_store.path)
    if cfg.federation is not None:
        root = Path(cfg.federation.shard_dir) if cfg.federation.shard_dir else None
        path = (root or source.run_dir / "stores") / "global"
        if (path / "manifest.json").exists():
            return path
    return None


def load_store(source: RunSource, retriever: Any) -> Any:
    """The run's knowledge store: the saved one, else rebuilt from the run's corpus with
    the (frozen) passage encoder, exactly as the run built it."""
    from fedrag_ray.data import load_dataset_from_config
    from fedrag_ray.knowledge_store import KnowledgeStore

    path = run_store_path(source)
    if path is not None:
        return KnowledgeStore.load(path, expected_dim=retriever.dim)
    ks = source.cfg.knowledge_store
    data = load_dataset_from_config(source.cfg.data)
    store = KnowledgeStore.from_config(retriever.dim, ks.model_copy(update={"device": "cpu"}))
    store.add(data.passages, retriever.encode_passages([p.text for p in data.passages]))
    from fedrag_ray.provenance import store_provenance

    store.provenance = store_provenance(retriever, data.passages, ks)
    store.build()
    return store


def load_run(
    run_dir: str | Path,
    server_round: int | None = None,
    trial: str | None = None,
    device: str | None = None,
) -> Any:
    """A ready :class:`~fedrag_ray.rag.RAGSystem` of a finished run: its config, trained
    state and knowledge store (what the LlamaIndex / LangChain bridges wrap)."""
    from fedrag_ray.rag import RAGSystem

    source = resolve_run(run_dir, server_round, trial)
    cfg = source.cfg if device is None else source.cfg.model_copy(update={"device": device})
    system = RAGSystem(cfg)
    system.load_trainable_state(source.state)
    system.store = load_store(source, system.retriever)
    return system


# --------------------------------------------------------------------------- writing


def write_sentence_transformer(encoder: Any, out: Path) -> None:
    """A sentence-transformers directory computing exactly ``encoder``'s embeddings:
    the HF encoder (any LoRA merged into a copy), its pooling, Dense layers, Normalize.
    Legacy pooling keys, which every sentence-transformers version reads."""
    from safetensors.torch import save_file

    from fedrag_ray.peft_import import import_peft

    PeftModel = import_peft().PeftModel

    out.mkdir(parents=True, exist_ok=True)
    model = encoder.model
    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out)
    encoder.tokenizer.save_pretrained(out)
    modules: list[dict[str, Any]] = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
    ]
    hidden = int(model.config.hidden_size)
    pool = {"word_embedding_dimension": hidden}
    for key, mode in {
        "pooling_mode_cls_token": "cls",
        "pooling_mode_mean_tokens": "mean",
        "pooling_mode_max_tokens": "max",
        "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
        "pooling_mode_lasttoken": "lasttoken",
    }.items():
        pool[key] = encoder.pooling == mode
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pool, indent=2))
    modules.append(
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
    )
    for layer in encoder.dense:
        i = len(modules)
        sub = f"{i}_Dense"
        (out / sub).mkdir()
        act = type(layer.activation)
        lin = layer.linear
        (out / sub / "config.json").write_text(
            json.dumps(
                {
                    "in_features": lin.in_features,
                    "out_features": lin.out_features,
                    "bias": lin.bias is not None,
                    "activation_function": f"{act.__module__}.{act.__name__}",
                },
                indent=2,
            )
        )
        tensors = {"linear.weight": lin.weight.detach().cpu().contiguous()}
        if lin.bias is not None:
            tensors["linear.bias"] = lin.bias.detach().cpu().contiguous()
        save_file(tensors, str(out / sub / "model.safetensors"))
        modules.append(
            {"idx": i, "name": str(i), "path": sub, "type": "sentence_transformers.models.Dense"}
        )
    i = len(modules)
    modules.append(
        {
            "idx": i,
            "name": str(i),
            "path": f"{i}_Normalize",
            "type": "sentence_transformers.models.Normalize",
        }
    )
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": encoder.max_length, "do_lower_case": encoder.do_lower_case})
    )
    (out / "config_sentence_transformers.json").write_text(
        json.dumps({"similarity_fn_name": "cosine", "prompts": {}, "default_prompt_name": None})
    )


def export_run(
    run_dir: str | Path,
    output: str | Path,
    server_round: int | None = None,
    trial: str | None = None,
    merge: bool = False,
    store: bool = True,
) -> dict[str, Any]:
    """Write the export directory (see the module docstring); returns its manifest."""
    from fedrag_ray.models import resolve_generator_path
    from fedrag_ray.retriever import resolve_retriever_path
    from fedrag_ray.text_encoder import TextEncoder

    source = resolve_run(run_dir, server_round, trial)
    cfg = source.cfg
    gen_arrays, ret_arrays = _split_state(source.state)
    base = resolve_generator_path(cfg.generator.model, cfg.generator.tiny_spec, cfg.seed)
    output = Path(output).resolve()
    if output == source.run_dir.resolve() or source.run_dir.resolve().is_relative_to(output):
        raise ExportError(f"--output {output}: must not be the run directory or contain it")
    written: dict[str, str] = {}
    with atomic_directory(output) as tmp, warnings.catch_warnings():
        # transformers' save_pretrained warns about its own deprecated internals
        warnings.simplefilter("ignore", FutureWarning)
        if gen_arrays:
            gen = load_generator(source)
            gen.model.save_pretrained(tmp / "generator")
            gen.tokenizer.save_pretrained(tmp / "generator")
            written["generator"] = "peft adapter"
            if merge:
                merged = gen.model.merge_and_unload()
                merged.save_pretrained(tmp / "generator-merged")
                gen.tokenizer.save_pretrained(tmp / "generator-merged")
                written["generator-merged"] = "transformers causal LM"
            del gen
        retriever = load_retriever(source)
        write_sentence_transformer(retriever.query_encoder, tmp / "query_encoder")
        written["query_encoder"] = "sentence-transformers"
        if ret_arrays or cfg.retriever.query_model is not None:
            passage = TextEncoder(
                resolve_retriever_path(cfg.retriever.model), cfg.retriever.max_length
            )
            write_sentence_transformer(passage, tmp / "passage_encoder")
            written["passage_encoder"] = "sentence-transformers"
        if store:
            load_store(source, retriever).save(tmp / "knowledge_store")
            written["knowledge_store"] = "fedrag_ray KnowledgeStore"
        manifest = {
            "format_version": EXPORT_FORMAT_VERSION,
            "source": {
                "run_dir": str(source.run_dir.resolve()),
                "kind": source.kind,
                "round": source.round,
                "trial": source.trial,
            },
            "method": cfg.train.method,
            "written": written,
            "generator": {
                "base_model": base,
                "trained": bool(gen_arrays),
                "trained_on_quantized_base": cfg.generator.quantization,
                "lora": cfg.generator.lora.model_dump(),
            },
            "retriever": {
                "trained": bool(ret_arrays),
                "train": cfg.retriever.train,
                "base_model": resolve_retriever_path(
                    cfg.retriever.query_model or cfg.retriever.model
                ),
            },
            "prompt": {
                "template": cfg.rag.prompt_template,
                "chat_template": cfg.generator.chat_template,
                "max_length": cfg.generator.max_length,
                "max_new_tokens": cfg.rag.max_new_tokens,
                "top_k": cfg.rag.top_k,
            },
            "config": cfg.model_dump(mode="json"),
        }
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
