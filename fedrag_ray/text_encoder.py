"""Sentence encoder: a Hugging Face encoder, a pooling step and L2 normalisation.

It reads the pipeline of a sentence-transformers directory (``modules.json``: Transformer,
Pooling, Dense, Normalize) or takes any plain Hugging Face encoder with mean pooling.

Why not ``sentence_transformers`` itself: importing it pulls scikit-learn, pandas, pyarrow
and datasets into every process that holds a retriever — each Ray client actor and the
driver — for about 130 MiB of resident memory and 5 s of import per process, to run what
is three small modules. ``tests/test_retriever_generator.py`` checks these embeddings
against ``SentenceTransformer.encode`` on the same model.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from fedrag_ray.progress import ProgressFn, report

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "lasttoken")
# sentence-transformers < 6 wrote one boolean per mode instead of ``pooling_mode``.
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
SUPPORTED_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")


def _model_file(path: str, filename: str) -> Path | None:
    """``filename`` inside a local model directory or a hub repo (cache or download);
    None only when the file is known not to exist (absent from the directory, or the
    hub says so / cached that it said so). Any other failure (offline without a cached
    copy, a network or permission error) raises: treating it as "missing" made a
    CLS-pooling model without a readable ``modules.json`` silently mean-pooled."""
    if Path(path).is_dir():
        f = Path(path) / filename
        return f if f.is_file() else None
    from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError

    cached = try_to_load_from_cache(path, filename)
    if cached is _CACHED_NO_EXIST:
        return None
    if isinstance(cached, str):
        return Path(cached)
    try:
        return Path(hf_hub_download(path, filename))
    except RemoteEntryNotFoundError:  # the repo has no such file
        return None
    except Exception as err:
        raise ValueError(
            f"retriever model {path}: cannot read {filename} ({type(err).__name__}: {err}); "
            "it decides the model's pooling, so fedrag_ray does not guess. Download the "
            "model once online, or point retriever.model at a local directory"
        ) from err


def _read_json(path: str, filename: str) -> dict[str, Any] | list[Any] | None:
    f = _model_file(path, filename)
    return json.loads(f.read_text()) if f else None


def _pooling_mode(config: dict[str, Any], where: str) -> str:
    mode = config.get("pooling_mode")
    if mode is None:
        mode = [m for key, m in LEGACY_POOLING_KEYS.items() if config.get(key)]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(
            f"{where}: unsupported pooling {modes}; exactly one of {list(POOLING_MODES)} "
            "is supported"
        )
    return str(modes[0])


class _Dense(torch.nn.Module):
    """sentence-transformers' Dense module: a linear layer and an activation."""

    def __init__(self, path: str, sub: str) -> None:
        super().__init__()
        cfg = _read_json(path, f"{sub}/config.json")
        if not isinstance(cfg, dict):
            raise ValueError(f"{path}: {sub}/config.json missing")
        self.linear = torch.nn.Linear(
            cfg["in_features"], cfg["out_features"], bias=cfg.get("bias", True)
        )
        act = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity"))
        name = act.rsplit(".", 1)[-1]
        if not act.startswith("torch.nn.") or not hasattr(torch.nn, name):
            raise ValueError(f"{path}: {sub} activation {act!r} is not a torch.nn module")
        self.activation = getattr(torch.nn, name)()
        weights = _model_file(path, f"{sub}/model.safetensors")
        if weights:
            from safetensors.torch import load_file

            state = load_file(str(weights))
        else:
            weights = _model_file(path, f"{sub}/pytorch_model.bin")
            if weights is None:
                raise ValueError(f"{path}: {sub} has no weights")
            state = torch.load(weights, map_location="cpu", weights_only=True)
        self.load_state_dict(
            {k: v for k, v in state.items() if k.startswith("linear.")}, strict=True
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.linear(x))


class TextEncoder(torch.nn.Module):
    """texts → unit-norm embeddings, differentiable through ``forward``."""

    def __init__(self, path: str, max_length: int) -> None:
        super().__init__()
        modules = _read_json(path, "modules.json") or []
        kinds = [str(m["type"]).rsplit(".", 1)[-1] for m in modules]
        unknown = [k for k in kinds if k not in SUPPORTED_MODULES]
        if unknown:
            raise ValueError(
                f"retriever model {path}: sentence-transformers modules {unknown} are not "
                f"supported (supported: {list(SUPPORTED_MODULES)})"
            )
        sub = {k: str(m.get("path", "")) for k, m in zip(kinds, modules, strict=True)}
        root = path if not sub.get("Transformer") else str(Path(path) / sub["Transformer"])
        st_cfg = _read_json(path, "sentence_bert_config.json") or {}
        assert isinstance(st_cfg, dict)
        self.do_lower_case = bool(st_cfg.get("do_lower_case", False))
        self.tokenizer = AutoTokenizer.from_pretrained(root)
        self.model: torch.nn.Module = AutoModel.from_pretrained(root)
        limit = getattr(self.model.config, "max_position_embeddings", max_length) or max_length
        self.max_length = min(int(max_length), int(limit))
        self.pooling = "mean"
        if "Pooling" in sub:
            pool_cfg = _read_json(path, f"{sub['Pooling']}/config.json")
            if not isinstance(pool_cfg, dict):
                raise ValueError(f"retriever model {path}: {sub['Pooling']}/config.json missing")
            self.pooling = _pooling_mode(pool_cfg, f"retriever model {path}")
        self.dense = torch.nn.ModuleList(
            _Dense(path, m.get("path", ""))
            for k, m in zip(kinds, modules, strict=True)
            if k == "Dense"
        )
        dims = [d.linear.out_features for d in self.dense]
        self.dim = int(dims[-1] if dims else self.model.config.hidden_size)

    # ------------------------------------------------------------------ encoding

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        texts = [str(t).strip() for t in texts]
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        return dict(
            self.tokenizer(
                texts,
                padding=True,
                truncation="longest_first",
                max_length=self.max_length,
                return_tensors="pt",
            )
        )

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
        if self.pooling == "lasttoken":  # last real token, whichever side was padded
            pos = torch.arange(mask.shape[1], device=mask.device)
            last = (mask * pos).argmax(dim=1)
            return hidden[torch.arange(len(hidden), device=hidden.device), last]
        summed = (hidden * m).sum(dim=1)
        counts = m.sum(dim=1).clamp(min=1e-9)
        return summed / (counts.sqrt() if self.pooling == "mean_sqrt_len_tokens" else counts)

    def forward(self, texts: list[str]) -> torch.Tensor:
        features = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        hidden = self.model(**features).last_hidden_state
        out = self._pool(hidden, features["attention_mask"])
        for layer in self.dense:
            out = layer(out)
        return F.normalize(out, dim=-1)

    @torch.no_grad()
    def encode(
        self, texts: list[str], batch_size: int, progress: bool | ProgressFn = False
    ) -> np.ndarray:
        """Inference in batches of similar length (less padding), in the input order.
        ``progress``: True for a tqdm bar, or a ``progress(stage, done, total)`` callback
        called with the texts encoded so far."""
        self.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        if callable(progress):
            report(progress, "embedding passages", 0, len(texts))
        elif progress:
            from tqdm.auto import tqdm

            # asked for: overrides the quiet mode's TQDM_DISABLE (runtime.quiet_env)
            starts = tqdm(starts, desc="encoding", unit="batch", disable=False)
        for s in starts:
            idx = order[s : s + batch_size]
            out[idx] = self.forward([texts[i] for i in idx]).float().cpu().numpy()
            if callable(progress):
                report(progress, "embedding passages", min(s + batch_size, len(texts)), len(texts))
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """The base model's outputs while a LoRA adapter is attached (peft)."""
        from fedrag_ray.peft_import import import_peft

        PeftModel = import_peft().PeftModel
        peft_model = isinstance(self.model, PeftModel)
        with self.model.disable_adapter() if peft_model else contextlib.nullcontext():
            yield
