"""Why fed-rag 0.0.27's RALT logs ``grad_norm: inf`` and never moves its loss on CPU.

Runs in the peer's venv (fed-rag's pins: torch 2.14.1, transformers 4.52.4, peft 0.15.2)::

    benchmarks/.peer-venv/bin/python benchmarks/peer/diagnose_grad_norm.py \\
        --generator DIR [--adapter LORA_DIR] [--out FILE]

It does three things, each a real forward/backward (no mocks):

1. **kernel**: one fully masked query row of ``F.scaled_dot_product_attention`` on CPU
   (every key at ``finfo.min``, the mask transformers 4.52 builds for left padding on
   CPU): the forward averages V correctly, but the backward weighs every key by 1 instead
   of 1/L. The backward recomputes the softmax from the log-sum-exp, and ``finfo.min +
   log L`` rounds back to ``finfo.min`` in fp32.
2. **model**: one batch shaped exactly as fed-rag's ``DataCollatorForRALT`` shapes it
   (left padding, labels = input ids, pads -100) through the generator, with the
   collator's variants: as the peer trains; without a loss on the last pad position (the
   collator keeps the label of the first real token, which the last *pad* row predicts);
   with transformers' ``_unmask_unattended`` applied on CPU (4.52 applies it on
   CUDA/XPU/NPU only); with eager attention. Gradient norm of the trainable parameters.
3. **trainer** (``--trainer-steps N``, optional): fed-rag's own ``HuggingFaceTrainerForRALT``
   as the harness builds it, N steps, the Trainer's logged ``loss`` / ``grad_norm``, with
   the default attention and with ``attn_implementation="eager"``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

TEXTS = [  # two lengths, so the shorter row is left-padded as in a RALT batch
    "Question: In what year did the University of Notre Dame admit women? Context: The "
    "university first admitted women as undergraduates in 1972. Response: 1972 " * 2,
    "Question: who wrote Hamlet? Response: Shakespeare",
]


def kernel_check() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    length, dim, pad = 8, 16, 4
    q, k, v = (torch.randn(1, 1, length, dim, requires_grad=True) for _ in range(3))
    mn = torch.finfo(torch.float32).min
    mask = torch.full((length, length), mn).triu(1)
    mask[:, :pad] = mn  # rows 0..pad-1 see only padding keys: fully masked
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])
    out[0, 0, pad - 1].sum().backward()  # upstream gradient on one fully masked row
    return {
        "forward_is_mean_of_v": bool(torch.allclose(out[0, 0, 0], v[0, 0].mean(0), atol=1e-5)),
        "backward_key_weights": [round(x, 4) for x in v.grad[0, 0, :, 0].tolist()],
        "correct_key_weight": 1 / length,
    }


def _grad_norm(model: Any) -> float:
    sq = sum(p.grad.double().pow(2).sum().item() for p in model.parameters() if p.grad is not None)
    return math.sqrt(sq)


def model_check(generator: str, adapter: str | None) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_attn_mask_utils import AttentionMaskConverter

    tok = AutoTokenizer.from_pretrained(generator)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = [tok(t)["input_ids"] for t in TEXTS]
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]).float()

    def labels(first_real_masked: bool) -> torch.Tensor:
        return torch.tensor(
            [[-100] * (width - len(x)) + ([-100] + x[1:] if first_real_masked else x) for x in ids]
        )

    variants = [
        ("as fed-rag trains (sdpa, left pad, labels = input ids)", "sdpa", False, False),
        ("no loss at the last pad position (first real label -100)", "sdpa", True, False),
        ("fully masked rows unmasked on CPU (4.52 does it on CUDA)", "sdpa", False, True),
        ("eager attention", "eager", False, False),
    ]
    rows = []
    for name, attn, first_masked, unmask in variants:
        base = AutoModelForCausalLM.from_pretrained(generator, attn_implementation=attn)
        cls = type(base.model)
        orig = cls._update_causal_mask
        if unmask:

            def patched(self: Any, *a: Any, _orig: Any = orig, **kw: Any) -> Any:
                m = _orig(self, *a, **kw)
                if m is None:
                    return None
                return AttentionMaskConverter._unmask_unattended(m, torch.finfo(m.dtype).min)

            cls._update_causal_mask = patched
        try:
            model = base
            if adapter:
                from peft import PeftModel

                model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
            out = model(input_ids=input_ids, attention_mask=mask, labels=labels(first_masked))
            out.loss.backward()
            rows.append({"variant": name, "loss": out.loss.item(), "grad_norm": _grad_norm(model)})
        finally:
            cls._update_causal_mask = orig
        print(f"{name:58s} loss {rows[-1]['loss']:.4f}  grad norm {rows[-1]['grad_norm']:.3g}")
    return rows


def trainer_check(
    generator: str, adapter: str | None, steps: int, work: Path, lr: float
) -> list[dict]:
    """fed-rag's RALT trainer as ``run_peer._manager`` builds it, on a few SQuAD-like rows
    over a 6-passage store; also the loss on one fixed batch (all rows) before and after
    training, which moves only if the steps did."""
    import importlib.util

    import torch

    runner = Path(__file__).with_name("run_peer.py")
    spec = importlib.util.spec_from_file_location("run_peer", runner)
    assert spec and spec.loader
    rp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rp)
    rp._one_thread()
    passages = [
        "Notre Dame admitted women as undergraduates for the first time in 1972.",
        "Hamlet is a tragedy written by William Shakespeare around 1600.",
        "The Eiffel Tower in Paris was completed in 1889 for the World's Fair.",
        "Photosynthesis converts light energy into chemical energy in plants.",
        "The Amazon is the largest rainforest on Earth, mostly in Brazil.",
        "Mount Everest, at 8,849 metres, is the highest mountain above sea level.",
    ]
    rows = [
        {"query": "When did Notre Dame first admit women?", "response": "1972"},
        {"query": "Who wrote Hamlet?", "response": "William Shakespeare"},
        {"query": "When was the Eiffel Tower completed?", "response": "1889"},
        {"query": "How high is Mount Everest?", "response": "8,849 metres"},
    ]
    out = []
    for attn in (None, "eager"):
        job = {
            "method": "ralt",
            "local_steps": steps,
            "batch_size": 2,
            "lr": lr,
            "seed": 0,
            "top_k": 2,
            "generator": generator,
            "generator_adapter": adapter,
            "generator_attn": attn,
            "retriever_path": None,
            "retriever_mode": "dual",
            "passages": passages,
        }
        wd = work / f"attn-{attn or 'default'}"
        wd.mkdir(parents=True, exist_ok=True)
        rp.run_prep(job, wd)
        manager = rp._manager(job, rp._rag_system(job, wd), rows, wd / "hf")
        hf = rp._trainer_of(manager).hf_trainer_obj
        before = {n: p.detach().clone() for n, p in hf.model.named_parameters() if p.requires_grad}
        fixed = hf.data_collator(rows)
        with torch.no_grad():
            loss_before = hf.model(**fixed).loss.item()
        hf.train()
        with torch.no_grad():
            loss_after = hf.model(**fixed).loss.item()
        moved = math.sqrt(
            sum(
                (p.detach() - before[n]).double().pow(2).sum().item()
                for n, p in hf.model.named_parameters()
                if p.requires_grad
            )
        )
        history = hf.state.log_history
        log = [{"loss": e["loss"], "grad_norm": e["grad_norm"]} for e in history if "loss" in e]
        name = attn or "default (sdpa)"
        out.append(
            {
                "attn_implementation": name,
                "lr": lr,
                "steps": log,
                "weight_change_l2": moved,
                "fixed_batch_loss_before_after": [loss_before, loss_after],
            }
        )
        print(
            f"trainer, attention {name}: {log}, weight change {moved:.3g}, "
            f"fixed-batch loss {loss_before:.4f} -> {loss_after:.4f}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", required=True, help="HF causal-LM dir (with tokenizer)")
    ap.add_argument("--adapter", default=None, help="PEFT LoRA dir on --generator")
    ap.add_argument("--trainer-steps", type=int, default=0, help="also run fed-rag's trainer")
    ap.add_argument("--trainer-lr", type=float, default=1e-4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/peer-grad-norm"))
    ap.add_argument("--out", type=Path, default=None, help="JSON of the findings")
    args = ap.parse_args(argv)
    import torch
    import transformers

    torch.set_num_threads(1)
    kernel = kernel_check()
    print("kernel:", kernel)
    result: dict[str, Any] = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "generator": args.generator,
        "adapter": args.adapter,
        "kernel": kernel,
        "model": model_check(args.generator, args.adapter),
    }
    if args.trainer_steps:
        result["trainer"] = trainer_check(
            args.generator, args.adapter, args.trainer_steps, args.work, args.trainer_lr
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
