#!/usr/bin/env bash
# Prepare .devrun/ (git-ignored via .git/info/exclude) for one lent GPU machine: the wheels
# its image lacks (pydantic, bitsandbytes, peft, transformers/hub at our pins; Python 3.12)
# and SmolLM2's config + tokenizer (its weights exceed the 64 MiB transfer limit, so the
# device builds the same architecture with random weights: speed/memory do not depend on
# values). Then: device run `bash benchmarks/gpu_device/run.sh` with carry [".devrun"].
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx "/.devrun/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.devrun/ >> .git/info/exclude; }
mkdir -p .devrun/whl .devrun/smollm2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .devrun/whl \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types typing-inspection \
  bitsandbytes==0.50.2 transformers==5.25.0 peft==0.21.2 huggingface_hub==2.4.0
src=$(.venv/bin/python -c "from fedrag_ray.config import GeneratorConfig as G; from fedrag_ray.models import resolve_generator_path as r; c = G(); print(r(c.model, c.tiny_spec, 0))")
cp "$src"/{config.json,tokenizer.json,tokenizer_config.json,generation_config.json,chat_template.jinja} .devrun/smollm2/
du -sh .devrun
