"""GPU path: QLoRA generator (4-bit NF4 base + LoRA) throughput and memory, faiss-gpu
search, and how many simulated clients fit per GPU at a given fraction.

    python benchmarks/gpu_path.py [--generator default|HF_PATH] [--out benchmarks/results]

On a CUDA machine it measures: training tokens/s (forward+backward+step) and peak GPU
memory of the 4-bit and the bf16 generator with LoRA, faiss-gpu flat search qps vs CPU on
100k x 384 vectors, and clients per GPU = floor(GPU memory / peak memory per client
actor). Without CUDA it runs the CPU half (4-bit NF4 + LoRA on CPU through bitsandbytes'
CPU backend, FAISS on CPU) and says plainly in the JSON that the GPU half was not run.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
from harness import RESULTS, offline_env, write_result


def generator_throughput(model: str, quantization: str, device: str, steps: int) -> dict[str, Any]:
    import torch

    from fedrag_ray.config import GeneratorConfig
    from fedrag_ray.generator import Generator

    cfg = GeneratorConfig(model=model, quantization=quantization, max_length=256)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gen = Generator(cfg, seed=0)
    if device == "cuda" and quantization == "none":
        gen.model.to("cuda")
    params = [p for p in gen.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    prompts = [
        "context: " + "the trial measured outcomes in patients " * 20 + "question: is it?\nanswer:"
    ] * 8
    answers = ["yes, the outcome improved in the treated group"] * 8
    ids = gen.encode_pairs(prompts, answers)[0]
    tokens = int(ids.numel())
    gen.model.train()
    loss = gen.loss(prompts, answers)  # warm-up
    loss.backward()
    opt.step()
    opt.zero_grad()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    losses = []
    for _ in range(steps):
        loss = gen.loss(prompts, answers)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    row = {
        "generator": model,
        "quantization": quantization,
        "device": device,
        "steps": steps,
        "tokens_per_step": tokens,
        "train_tokens_per_s": tokens * steps / seconds,
        "seconds_per_step": seconds / steps,
        "loss_first_last": [losses[0], losses[-1]],
        "trainable_params": int(sum(p.numel() for p in params)),
        "linear4bit_layers": sum(type(m).__name__ == "Linear4bit" for m in gen.model.modules()),
    }
    if device == "cuda":
        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        from harness.memory import process_tree  # psutil: the CPU half only

        row["process_rss_mib"] = process_tree()[0].memory_info().rss / 2**20
    return row


def faiss_search(use_gpu: bool, n: int = 100_000, queries: int = 2_000) -> dict[str, Any]:
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.integers(0, n, queries)]
    index = faiss.IndexFlatIP(384)
    index.add(x)
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.search(q[:10], 10)
    t = time.perf_counter()
    index.search(q, 10)
    seconds = time.perf_counter() - t
    return {"index": "flat", "n": n, "gpu": use_gpu, "qps": queries / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generator", default="default")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gpu-fraction", type=float, default=0.1)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--gpu-only", action="store_true", help="skip the CPU half (a lent GPU machine's minutes)"
    )
    args = ap.parse_args()
    offline_env()
    import torch

    try:
        from fedrag_ray.knowledge_store import faiss_gpu_count
    except ImportError:  # a GPU machine without FAISS: the generator half still runs

        def faiss_gpu_count() -> int:
            return 0

    cuda = torch.cuda.is_available()
    rows: dict[str, Any] = {"cpu": [], "gpu": []}
    if not args.gpu_only:
        rows["cpu"].append(generator_throughput(args.generator, "4bit", "cpu", args.steps))
        rows["cpu"].append(generator_throughput(args.generator, "none", "cpu", args.steps))
        rows["cpu"].append(faiss_search(False))
    gpu_note = "GPU half not run: no CUDA device on this machine."
    if cuda:
        gpu_note = f"GPU: {torch.cuda.get_device_name(0)}"
        for quant in ("4bit", "none"):
            rows["gpu"].append(generator_throughput(args.generator, quant, "cuda", args.steps))
        total = torch.cuda.get_device_properties(0).total_memory / 2**20
        per_client = max(r["peak_gpu_mib"] for r in rows["gpu"] if r["quantization"] == "4bit")
        rows["clients_per_gpu"] = {
            "gpu_memory_mib": total,
            "peak_mib_per_client_4bit": per_client,
            "fit_by_memory": int(total // per_client),
            "fit_by_fraction": int(1 / args.gpu_fraction),
            "fraction": args.gpu_fraction,
        }
        if faiss_gpu_count():
            rows["gpu"].append(faiss_search(True))
        else:
            gpu_note += "; faiss-gpu not installed, FAISS GPU search not run"
        gpu_note += f"; torch {torch.__version__}, generator {args.generator}"
    write_result("gpu_path", {"note": gpu_note, "results": rows}, args.out)
    print(gpu_note)
    for part in ("cpu", "gpu"):
        for r in rows[part]:
            print(part, json.dumps(r))


if __name__ == "__main__":
    main()
