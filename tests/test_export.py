"""Export for real: a tiny fine-tuned run → PEFT adapter read by plain peft, merged HF
model read by plain transformers, query encoder read by sentence-transformers, the store;
and the Tune best-trial path through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from shared_data import write_pubmedqa_items

from fedrag_ray.centralized import run_centralized
from fedrag_ray.config import config_from_dict
from fedrag_ray.export import ExportError, export_run, load_run, resolve_run
from fedrag_ray.knowledge_store import KnowledgeStore

# float32 on both sides; the only difference is padding/position handling of one row
LOGPROB_ATOL = 1e-4
EMBED_ATOL = 1e-5
QUERIES = ["Do mitochondria matter in apoptosis?", "Is aspirin effective after stroke?"]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_pubmedqa_items(tmp_path_factory.mktemp("data") / "pqa_20.json", 20)


def tiny_raw(data_path, **train) -> dict:
    return {
        "name": "tiny-export",
        "seed": 1,
        "data": {"path": str(data_path), "max_train": 8, "max_eval": 2},
        "retriever": {"max_length": 64, "train": "lora", "lora_r": 4},
        # autocast none: fedrag_ray computes in float32 like the plain-transformers side
        "generator": {"model": "tiny-random", "max_length": 64, "autocast": "none"},
        "rag": {"max_new_tokens": 4},
        "eval": {"generate": False, "closed_book": False},
        "train": {
            "method": "both",
            "both_mode": "combined",
            "batch_size": 4,
            "lr": 5e-2,
            "retriever_lr": 5e-3,
            "lr_schedule": "constant",
            **train,
        },
    }


@pytest.fixture(scope="module")
def both_run(tmp_path_factory, data_path):
    """RA-DIT `both`: generator LoRA + query-encoder LoRA, exported with --merge."""
    tmp = tmp_path_factory.mktemp("both")
    cfg = config_from_dict(tiny_raw(data_path))
    results = run_centralized(cfg, tmp / "run")
    manifest = export_run(tmp / "run", tmp / "export", merge=True)
    return results["system"], tmp / "export", manifest


def _plain_logprobs(model, tokenizer, prompts, answers) -> list[float]:
    """Sum of log P(answer tokens + end token | prompt), one unpadded row at a time, with
    nothing but the tokenizer and the model (WordPiece: [CLS] prompt answer [SEP])."""
    out = []
    model.eval()
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = tokenizer(prompt + " " + answer, add_special_tokens=True)["input_ids"]
        n = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1  # + [SEP]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0].float()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        targets = x[0, 1:]
        tok = logp.gather(-1, targets[:, None])[:, 0]
        out.append(float(tok[-n:].sum()))
    return out


def _prompts(system) -> tuple[list[str], list[str]]:
    passages = [p.text for p in system.store.passages[:3]]
    questions = ["Is this treatment effective?", "Do the results support it?", "Was it safe?"]
    prompts = [system.prompt(q, p, reserve=4) for q, p in zip(questions, passages, strict=True)]
    return prompts, ["yes", "no", "maybe"]


def test_peft_adapter_loaded_by_plain_peft_gives_fedrag_logprobs(both_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    system, out, manifest = both_run
    files = sorted(p.name for p in (out / "generator").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    adapter_cfg = json.loads((out / "generator" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16
    assert sorted(adapter_cfg["target_modules"]) == ["q_proj", "v_proj"]

    prompts, answers = _prompts(system)
    ours, n_tok = system.generator.answer_logprobs(prompts, answers)
    tokenizer = AutoTokenizer.from_pretrained(out / "generator")
    base_path = manifest["generator"]["base_model"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    untuned = _plain_logprobs(base, tokenizer, prompts, answers)
    peft_model = PeftModel.from_pretrained(base, out / "generator")
    theirs = _plain_logprobs(peft_model, tokenizer, prompts, answers)
    assert ours.tolist() == pytest.approx(theirs, abs=LOGPROB_ATOL)
    # the adapter is what makes the difference (trained LoRA B is not zero)
    assert max(abs(a - b) for a, b in zip(theirs, untuned, strict=True)) > 1e-2

    merged = AutoModelForCausalLM.from_pretrained(out / "generator-merged", dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    merged_lp = _plain_logprobs(merged, tokenizer, prompts, answers)
    assert merged_lp == pytest.approx(ours.tolist(), abs=LOGPROB_ATOL)


def test_query_encoder_lora_merged_into_sentence_transformers_dir(both_run):
    from sentence_transformers import SentenceTransformer

    system, out, manifest = both_run
    assert manifest["retriever"]["trained"] and manifest["retriever"]["train"] == "lora"
    st = SentenceTransformer(str(out / "query_encoder"), device="cpu")
    theirs = st.encode(QUERIES, convert_to_numpy=True)
    ours = system.retriever.encode_queries(QUERIES)
    np.testing.assert_allclose(theirs, ours, atol=EMBED_ATOL)
    # the passage encoder (frozen, it built the index) is exported beside it, and differs
    st_passage = SentenceTransformer(str(out / "passage_encoder"), device="cpu")
    passages = [p.text for p in system.store.passages[:4]]
    np.testing.assert_allclose(
        st_passage.encode(passages), system.retriever.encode_passages(passages), atol=EMBED_ATOL
    )
    assert np.abs(st_passage.encode(QUERIES) - ours).max() > 1e-4


def test_knowledge_store_and_manifest(both_run):
    system, out, manifest = both_run
    store = KnowledgeStore.load(out / "knowledge_store")
    assert [p.id for p in store.passages] == [p.id for p in system.store.passages]
    np.testing.assert_array_equal(store.embeddings, system.store.embeddings)
    saved = json.loads((out / "fedrag_export.json").read_text())
    assert saved == manifest
    assert saved["source"]["kind"] == "centralized" and saved["method"] == "both"
    assert set(saved["written"]) == {
        "generator",
        "generator-merged",
        "query_encoder",
        "passage_encoder",
        "knowledge_store",
    }
    assert saved["prompt"]["template"] == system.cfg.rag.prompt_template


def test_load_run_rebuilds_the_trained_system(both_run):
    system, out, manifest = both_run
    loaded = load_run(manifest["source"]["run_dir"])
    state, live = loaded.trainable_state(), system.trainable_state()
    assert state.keys() == live.keys()
    assert all(np.array_equal(state[k], live[k]) for k in state)
    s1, i1 = loaded.retrieve(QUERIES, 3)
    s2, i2 = system.retrieve(QUERIES, 3)
    np.testing.assert_array_equal(i1, i2)


def test_full_query_encoder_export(tmp_path, data_path):
    """retriever.train full (LSR only): no generator adapter, a full query encoder."""
    from sentence_transformers import SentenceTransformer

    raw = tiny_raw(data_path, method="lsr")
    raw["retriever"]["train"] = "full"
    results = run_centralized(config_from_dict(raw), tmp_path / "run")
    manifest = export_run(tmp_path / "run", tmp_path / "export", store=False)
    assert set(manifest["written"]) == {"query_encoder", "passage_encoder"}
    assert not manifest["generator"]["trained"]
    st = SentenceTransformer(str(tmp_path / "export" / "query_encoder"), device="cpu")
    ours = results["system"].retriever.encode_queries(QUERIES)
    np.testing.assert_allclose(st.encode(QUERIES), ours, atol=EMBED_ATOL)
    base = SentenceTransformer(str(tmp_path / "export" / "passage_encoder"), device="cpu")
    assert np.abs(base.encode(QUERIES) - ours).max() > 1e-4  # LSR moved the query encoder


def test_wrong_inputs_name_the_problem(tmp_path, both_run):
    _, out, manifest = both_run
    run_dir = manifest["source"]["run_dir"]
    with pytest.raises(ExportError, match="run directory not found"):
        resolve_run(tmp_path / "nope")
    with pytest.raises(ExportError, match="no results.json"):
        resolve_run(out)
    with pytest.raises(ExportError, match="centralized run"):
        resolve_run(run_dir, server_round=1)
    with pytest.raises(ExportError, match="not a sweep"):
        resolve_run(run_dir, trial="x")
    with pytest.raises(ExportError, match="must not be the run directory"):
        export_run(run_dir, run_dir)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text(json.dumps({"config": {"train": {"lr": -1}}}))
    with pytest.raises(Exception, match="train.lr"):
        resolve_run(bad)


@pytest.mark.timeout(600)
def test_tune_best_trial_exported_by_the_cli(tmp_path, data_path):
    """A real two-trial sweep (centralized trials); `fedrag-ray export SWEEP_DIR` picks the
    best trial, whose adapter is the one exported."""
    import yaml
    from safetensors.numpy import load_file

    raw = tiny_raw(data_path, method="ralt")
    raw["retriever"]["train"] = "none"
    raw["tune"] = {
        "metric": "accuracy",
        "mode": "max",
        "search_alg": "grid",
        "space": {"train.lr": {"type": "grid", "values": [1e-3, 5e-2]}},
        "scheduler": {"name": "fifo"},
    }
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(raw))
    sweep = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fedrag_ray.cli"]
    proc = subprocess.run(
        [*cmd, "tune", str(config), "-o", str(sweep), "--num-cpus", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = json.loads((sweep / "tune_results.json").read_text())["best"]["trial"]
    proc = subprocess.run(
        [*cmd, "export", str(sweep), "-o", str(tmp_path / "export"), "--no-store"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "export" / "fedrag_export.json").read_text())
    assert manifest["source"] == {
        "run_dir": str((sweep / "sweep" / best / "run").resolve()),
        "kind": "tune",
        "round": None,
        "trial": best,
    }
    with np.load(sweep / "sweep" / best / "run" / "trainable_state.npz") as npz:
        b_trained = {k: npz[k] for k in npz.files if "lora_B" in k}
    adapter = load_file(str(tmp_path / "export" / "generator" / "adapter_model.safetensors"))
    b_exported = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert len(b_exported) == len(b_trained) > 0
    for k, v in b_trained.items():  # peft drops the adapter name from the saved keys
        name = k[len("generator.") :].replace(".default", "")
        np.testing.assert_array_equal(b_exported[name], v)
    # a wrong trial name is a clear error, exit status 2
    proc = subprocess.run(
        [*cmd, "export", str(sweep), "-o", str(tmp_path / "x"), "--trial", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2 and "no trial 'nope'" in " ".join(proc.stderr.split())
