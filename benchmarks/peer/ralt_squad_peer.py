"""The peer (fed-rag 0.0.27) doing centralized RALT on quality_squad's SQuAD task; one JSON.

Runs in the peer's venv, on a job file written by ``squad_task.export_job`` (our venv)::

    benchmarks/.peer-venv/bin/python benchmarks/peer/ralt_squad_peer.py \\
        --job JOB.json --generator DIR --work DIR --out PEER.json

Peer code is used as shipped: fed-rag's ``InMemoryKnowledgeStore`` over every passage of
the job (encoded by its MiniLM retriever), ``HFPeftModelGenerator`` on a fresh LoRA
adapter (the job's r / alpha / dropout / target modules, B = 0), its
``HuggingFaceTrainerForRALT`` with the job's steps, batch, learning rate, warmup, cosine
schedule with a floor, weight decay and gradient clip, and ``RAGConfig(top_k=job top_k)``.
Evaluation is ``rag_system.query(question)`` per question with greedy decoding of the
job's ``max_new_tokens``; the answer is scored by our side (``squad_task.score``).

Two choices are the harness's and are recorded in the JSON:

- ``--attn``: the generator's ``attn_implementation``. ``default`` is what fed-rag ships
  (transformers' sdpa); on CPU its left-padded RALT batches blow the gradient up to
  ``inf`` and nothing trains (README: "grad_norm: inf"). ``eager`` is the one-argument
  workaround a fed-rag user has (``load_base_model_kwargs``).
- ``--prompt``: ``ralt`` (default) evaluates with the training template's prompt part
  (``DataCollatorForRALT``'s template up to ``<response>``), so the model is asked what it
  was trained on; ``generator`` uses the generator's own ``DEFAULT_PROMPT_TEMPLATE``
  (``<query>`` tags, other wording), which is what ``RAGSystem.query`` uses unless told.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _run_peer() -> Any:
    """run_peer.py's helpers (thread setup, retriever, knowledge-store name), by path."""
    spec = importlib.util.spec_from_file_location("run_peer", HERE / "run_peer.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rp = _run_peer()


def _store(job: dict[str, Any], cache: Path) -> tuple[Any, float]:
    """fed-rag's in-memory store over the job's passages, persisted under ``cache`` keyed by
    the passages' hash (the full SQuAD corpus takes minutes to encode on one thread)."""
    from fed_rag.data_structures import KnowledgeNode
    from fed_rag.knowledge_stores.in_memory import InMemoryKnowledgeStore

    texts = [p["text"] for p in job["passages"]]
    key = hashlib.sha256(json.dumps(job["passages"]).encode()).hexdigest()[:16]
    where = cache / f"store-{key}"
    t = time.time()
    if (where / "done").exists():
        store = InMemoryKnowledgeStore(name=rp.KS_NAME, cache_dir=str(where))
        store.load()
        return store, time.time() - t
    retriever = rp._retriever({"retriever_path": None, "retriever_mode": "dual"}, for_prep=True)
    emb = retriever.encode_context(texts)
    nodes = [
        KnowledgeNode(
            node_id=p["id"], node_type="text", text_content=p["text"], embedding=emb[i].tolist()
        )
        for i, p in enumerate(job["passages"])
    ]
    store = InMemoryKnowledgeStore.from_nodes(nodes, name=rp.KS_NAME, cache_dir=str(where))
    store.persist()
    (where / "done").write_text(key)
    return store, time.time() - t


def _adapter(generator: str, s: dict[str, Any], work: Path) -> Path:
    """A fresh LoRA adapter (B = 0: the model starts as the base), saved with the peer's
    peft: fed-rag's PeftModel generator loads adapters from a directory only."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = work / f"lora-r{s['lora_r']}-a{s['lora_alpha']}-{'-'.join(s['lora_targets'])}"
    if not (out / "adapter_config.json").exists():
        torch.manual_seed(s["seed"])
        cfg = LoraConfig(
            r=s["lora_r"],
            lora_alpha=s["lora_alpha"],
            lora_dropout=s["lora_dropout"],
            target_modules=s["lora_targets"],
            task_type="CAUSAL_LM",
        )
        get_peft_model(AutoModelForCausalLM.from_pretrained(generator), cfg).save_pretrained(out)
    return out


def _prompt_template(kind: str) -> str | None:
    if kind == "generator":
        return None  # the generator's DEFAULT_PROMPT_TEMPLATE
    from fed_rag.data_collators.huggingface.ralt import DEFAULT_EXAMPLE_TEMPLATE

    return DEFAULT_EXAMPLE_TEMPLATE.split("{response}")[0]


def _lora_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _evaluate(rag: Any, questions: list[dict[str, Any]]) -> tuple[list[dict], float]:
    out, t = [], time.time()
    for i, q in enumerate(questions):
        res = rag.query(q["question"])
        node = res.source_nodes[0].node if res.source_nodes else None
        out.append({"id": q["id"], "response": res.response, "retrieved": [node.node_id]})
        if (i + 1) % 50 == 0:
            print(f"evaluated {i + 1}/{len(questions)}", flush=True)
    return out, time.time() - t


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from fed_rag import RAGConfig, RAGSystem
    from fed_rag.generators.huggingface import HFPeftModelGenerator
    from fed_rag.trainers.huggingface.ralt import HuggingFaceTrainerForRALT
    from transformers import GenerationConfig, TrainingArguments

    torch.set_num_threads(args.threads)
    job = json.loads(args.job.read_text())
    s = job["settings"]
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    store, store_s = _store(job, args.work)
    adapter = _adapter(str(args.generator), s, args.work)
    generator = HFPeftModelGenerator(
        model_name=str(adapter),
        base_model_name=str(args.generator),
        load_model_kwargs={"is_trainable": True},
        load_base_model_kwargs={} if args.attn == "default" else {"attn_implementation": args.attn},
        generation_config=GenerationConfig(
            max_new_tokens=s["max_new_tokens"], do_sample=False, num_beams=1
        ),
        prompt_template=_prompt_template(args.prompt),
    )
    rag = RAGSystem(
        generator=generator,
        retriever=rp._retriever({"retriever_path": None, "retriever_mode": "dual"}),
        knowledge_store=store,
        rag_config=RAGConfig(top_k=s["top_k"]),
    )
    result: dict[str, Any] = {
        "system": "fed-rag",
        "attn_implementation": args.attn,
        "prompt": args.prompt,
        "threads": args.threads,
        "store_s": store_s,
        "n_passages": len(job["passages"]),
        "settings": s,
        "versions": rp.harness.versions(rp.PEER_PACKAGES, absent="absent"),
    }
    if args.before:
        result["predictions_before"], result["eval_before_s"] = _evaluate(rag, job["eval"])
    train_ds = Dataset.from_dict(
        {
            "query": [r["query"] for r in job["train"]],
            "response": [r["response"] for r in job["train"]],
        }
    )
    targs = TrainingArguments(
        output_dir=str(args.work / "hf"),
        max_steps=s["steps"],
        per_device_train_batch_size=s["batch_size"],
        learning_rate=s["lr"],
        warmup_steps=s["warmup_steps"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": s["min_lr_ratio"]},
        weight_decay=s["weight_decay"],
        max_grad_norm=s["grad_clip"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=s["seed"],
        disable_tqdm=True,
    )
    trainer = HuggingFaceTrainerForRALT(
        rag_system=rag, train_dataset=train_ds, training_arguments=targs
    )
    hf = trainer.hf_trainer_obj
    before = _lora_state(hf.model)
    t = time.time()
    trained = trainer.train()
    result["train_s"] = time.time() - t
    moved = sum(
        (p.detach() - before[n]).double().pow(2).sum().item()
        for n, p in hf.model.named_parameters()
        if p.requires_grad
    )
    result.update(
        {
            "train_loss": trained.loss,
            "step_log": [
                {k: e[k] for k in ("step", "loss", "grad_norm", "learning_rate") if k in e}
                for e in hf.state.log_history
                if "loss" in e
            ],
            "trainable_parameters": sum(p.numel() for p in before.values()),
            "lora_weight_change_l2": math.sqrt(moved),
            "lora_initial_l2": math.sqrt(
                sum(p.double().pow(2).sum().item() for p in before.values())
            ),
        }
    )
    hf.model.eval()
    with torch.no_grad():
        result["predictions_after"], result["eval_after_s"] = _evaluate(rag, job["eval"])
    result["total_s"] = time.time() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", type=Path, required=True, help="squad_task.export_job's JSON")
    ap.add_argument("--generator", type=Path, required=True, help="HF causal-LM dir")
    ap.add_argument("--work", type=Path, required=True, help="store cache, adapter, HF output")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--attn", choices=["default", "eager", "sdpa"], default="default")
    ap.add_argument("--prompt", choices=["ralt", "generator"], default="ralt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--before", action="store_true", help="also evaluate the untrained model")
    args = ap.parse_args(argv)
    rp.harness.write_json(args.out, run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
