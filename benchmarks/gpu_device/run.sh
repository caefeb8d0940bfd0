#!/usr/bin/env bash
# On the lent GPU machine, after prepare.sh here: CUDA paths of the generator tests and the
# GPU half of benchmarks/gpu_path.py (results and pytest log under $OUT).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devrun/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 FEDRAG_RAY_CACHE=/tmp/frc PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch,transformers,peft,bitsandbytes,pydantic,tokenizers;print('torch',torch.__version__,'cuda',torch.cuda.is_available(),'tf',transformers.__version__,'peft',peft.__version__,'bnb',bitsandbytes.__version__,'tok',tokenizers.__version__)" 2>&1 | tail -2
timeout 90 python3 benchmarks/gpu_device/random_smollm2.py .devrun/smollm2 /tmp/smollm2-random 2>&1 | tail -2
timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_peft_import.py tests/test_retriever_generator.py -k "peft or tiny_generator or generator_built or encode_pairs or loss_equals or answer_logprobs or generate_after or qlora or device_and_compute or bf16_autocast" 2>&1 | tee $OUT/pytest.log | tail -25
timeout 200 python3 benchmarks/gpu_path.py --generator /tmp/smollm2-random --gpu-only --steps 10 --out $OUT 2>&1 | grep -v Warning | tail -12
