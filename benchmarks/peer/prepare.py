"""What both systems load before any run: the peer's venv, the generator directory they
share and the peer's LoRA adapter for RALT."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .job import ENV, GEN_LORA_TARGETS, PEER_DIR, PEER_PY, PEER_SETUP, SEED


def ensure_peer_venv() -> None:
    """The peer's own venv from the requirements file kept in this repository (idempotent:
    the setup script is a no-op when its marker matches the requirements)."""
    marker = PEER_PY.parent.parent / ".peer-setup-complete"
    if PEER_PY.exists() and marker.exists():
        return
    print(f"setting up the peer venv ({PEER_SETUP.name}); several minutes", flush=True)
    subprocess.run(["bash", str(PEER_SETUP)], check=True, env={**os.environ, **ENV})


def ensure_generator(work: Path, kind: str = "smollm2") -> Path:
    """The generator both systems load, from the same directory: SmolLM2-135M-Instruct
    (our offline default, converted from its GGUF) or the tiny random Llama. The SmolLM2
    copy's config also carries ``rope_theta`` at the top level, the spelling the peer's
    transformers 4.52 reads (5.x writes ``rope_parameters``); without it 4.52 would use
    its default theta and a different model. Its tokenizer config names a class 4.52
    knows."""
    if kind == "smollm2":
        import shutil

        from fedrag_ray.config import TinyGeneratorSpec
        from fedrag_ray.models import resolve_generator_path

        src = Path(resolve_generator_path("default", TinyGeneratorSpec(), SEED))
        out = work / "smollm2-135m-instruct"
        if not (out / "config.json").exists():
            tmp = work / ".smollm2.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            cfg = json.loads((tmp / "config.json").read_text())
            theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
            if theta is not None:
                cfg["rope_theta"] = theta
            cfg.setdefault("torch_dtype", "float32")
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            # 5.x names its generic fast tokenizer class TokenizersBackend; 4.52 calls the
            # same thing (tokenizer.json + special tokens) PreTrainedTokenizerFast
            tok = json.loads((tmp / "tokenizer_config.json").read_text())
            if tok.get("tokenizer_class") == "TokenizersBackend":
                tok["tokenizer_class"] = "PreTrainedTokenizerFast"
                (tmp / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
            tmp.rename(out)
        return out
    out = work / "tiny-llama"
    if not (out / "config.json").exists():
        subprocess.run(
            [str(PEER_PY), str(PEER_DIR / "make_tiny_generator.py"), "--out", str(out)],
            check=True,
            env={**os.environ, **ENV},
        )
    return out


def ensure_peer_adapter(work: Path, generator: Path) -> Path:
    """A fresh LoRA adapter on the generator, saved with the peer's peft, for its RALT: the
    same shape as ours (r 8, alpha 16, no dropout, q/k/v/o), B = 0 so the model starts as
    the base. fed-rag then trains and ships these adapters only (its PeftModel path)."""
    out = work / f"{generator.name}-lora-r8"
    if (out / "adapter_config.json").exists():
        return out
    code = (
        "import sys, torch; from pathlib import Path\n"
        "from peft import LoraConfig, get_peft_model\n"
        "from transformers import AutoModelForCausalLM\n"
        "torch.manual_seed(0)\n"
        "base = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type='CAUSAL_LM', "
        f"target_modules={GEN_LORA_TARGETS!r})\n"
        "tmp = Path(sys.argv[2] + '.tmp'); get_peft_model(base, cfg).save_pretrained(tmp)\n"
        "tmp.rename(sys.argv[2])\n"
    )
    subprocess.run(
        [str(PEER_PY), "-c", code, str(generator), str(out)],
        check=True,
        env={**os.environ, **ENV},
    )
    return out
