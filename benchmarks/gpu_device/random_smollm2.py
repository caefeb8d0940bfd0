"""SmolLM2-135M's architecture and tokenizer with random weights: its weights (538 MB) exceed
the device transfer limit; throughput and memory do not depend on the values."""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src, dst, dirs_exist_ok=True)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
model.save_pretrained(dst)
print("random SmolLM2 params", sum(p.numel() for p in model.parameters()))
