"""peft without bitsandbytes for unquantized models, and QLoRA still working afterwards in
the same process. Each case runs in a fresh interpreter: what is imported is process state."""

from __future__ import annotations

import json
import subprocess
import sys

BNB_LOADED = "sys.modules.get('bitsandbytes') is not None"

UNQUANTIZED_THEN_4BIT = f"""
import json, sys, torch
from fedrag_ray.config import GeneratorConfig, RetrieverConfig
from fedrag_ray.generator import Generator
from fedrag_ray.retriever import BiEncoderRetriever

out = {{}}
ret = BiEncoderRetriever(RetrieverConfig(train="lora", lora_r=4, lora_alpha=8))
gen = Generator(GeneratorConfig(model="tiny-random", max_length=64))
out["plain_bnb"] = {BNB_LOADED}
out["plain_lora"] = [
    sum("lora_A" in n for n, _ in m.named_parameters())
    for m in (ret.query_encoder.model, gen.model)
]
q = Generator(GeneratorConfig(model="tiny-random", quantization="4bit", max_length=64))
out["q_bnb"] = {BNB_LOADED}
from peft.tuners.lora.bnb import Linear4bit
q_proj = q.model.get_base_model().model.layers[0].self_attn.q_proj
out["q_lora_layer"] = type(q_proj).__name__
out["q_is_lora4bit"] = isinstance(q_proj, Linear4bit)
ids = torch.tensor([[1, 5, 9, 13, 2]])
loss = q.model(input_ids=ids, labels=ids).loss
loss.backward()
grads = [p.grad for n, p in q.model.named_parameters() if "lora_B" in n]
out["q_grads_finite"] = bool(grads) and all(
    g is not None and bool(torch.isfinite(g).all()) for g in grads
)
out["q_grad_norm"] = float(sum(g.abs().sum() for g in grads))
print(json.dumps(out))
"""


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_plain_peft_import_pulls_in_bitsandbytes():
    """The control: without fedrag_ray's import, peft loads bitsandbytes (else the next
    test would pass vacuously)."""
    out = _run(f"import json, sys, peft; print(json.dumps({{'bnb': {BNB_LOADED}}}))")
    assert out["bnb"] is True


def test_unquantized_lora_leaves_bitsandbytes_out_and_qlora_still_works_after():
    out = _run(UNQUANTIZED_THEN_4BIT)
    assert out["plain_bnb"] is False, "LoRA on unquantized models imported bitsandbytes"
    assert all(n > 0 for n in out["plain_lora"]), out["plain_lora"]
    assert out["q_bnb"] is True
    assert out["q_is_lora4bit"], out["q_lora_layer"]
    assert out["q_grads_finite"] and out["q_grad_norm"] > 0, out
