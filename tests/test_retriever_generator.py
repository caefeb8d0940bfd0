"""Retriever (MiniLM bi-encoder, full / LoRA / frozen) and the tiny-random generator (RALT
answer-only masking on left-padded rows, 4-bit NF4 and 8-bit QLoRA on CPU) with the real
libraries. The real default generator (SmolLM2) is tested in test_generator_real.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedrag_ray.config import GeneratorConfig, RetrieverConfig, TinyGeneratorSpec
from fedrag_ray.generator import Generator
from fedrag_ray.models import build_tiny_generator, minilm_path, tiny_generator_dir
from fedrag_ray.retriever import BiEncoderRetriever

TEXTS = [
    "Aspirin lowers body temperature in patients with fever.",
    "The stock market closed higher on Friday after strong earnings.",
    "Myocardial infarction is caused by blocked coronary arteries.",
]


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- retriever


def test_default_retriever_offline_minilm(retriever):
    assert retriever.dim == 384
    assert retriever.cfg.model == "default"
    emb = retriever.encode_passages(TEXTS)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    q = retriever.encode_queries(["What drug reduces a fever?", "What causes a heart attack?"])
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert (q @ emb.T).argmax(axis=1).tolist() == [0, 2]  # a real sentence encoder


def test_shared_at_init_query_equals_passage_encoder(retriever):
    assert retriever.trains
    assert retriever.query_encoder is not retriever.passage_encoder
    np.testing.assert_allclose(
        retriever.encode_queries(TEXTS), retriever.encode_passages(TEXTS), atol=1e-5
    )
    assert not _trainable(retriever.passage_encoder)
    q_named = list(retriever.query_encoder.named_parameters())
    q_params = [p for _, p in q_named]
    # everything trains except BERT's pooler, which mean pooling never uses
    assert all(p.requires_grad != (".pooler." in n) for n, p in q_named)
    assert any(".pooler." in n for n, _ in q_named)
    passage_ptrs = {p.data_ptr() for p in retriever.passage_encoder.parameters()}
    assert not passage_ptrs & {p.data_ptr() for p in q_params}  # a copy, not shared storage


def test_query_encoder_has_gradient_passage_encoder_none(retriever):
    r = copy.deepcopy(retriever)
    q = r.encode_queries_train(TEXTS[:2])
    assert q.requires_grad and q.shape == (2, 384)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)
    q.sum().backward()
    # every encoder weight gets a gradient; BERT's pooler is unused by mean pooling
    grads = [p.grad for n, p in r.query_encoder.named_parameters() if ".pooler." not in n]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in r.passage_encoder.parameters())


def test_lora_retriever_trains_only_lora_params():
    r = BiEncoderRetriever(RetrieverConfig(train="lora", lora_r=4, lora_alpha=8), seed=0)
    trainable = _trainable(r.query_encoder)
    assert trainable and all("lora_" in n for n in trainable)
    # MiniLM: 6 layers x (query, value) x (A: 384x4 + B: 4x384)
    assert sum(p.numel() for p in trainable.values()) == 6 * 2 * 2 * 384 * 4
    # one set of base weights: the passage side is the same model, adapters off
    assert r.query_encoder is r.passage_encoder and r.trains
    base = [p for n, p in r.query_encoder.named_parameters() if "lora_" not in n]
    assert base and not any(p.requires_grad for p in base)
    # LoRA B starts at zero: the query side still equals the passage side
    before = r.encode_passages(TEXTS)
    np.testing.assert_allclose(r.encode_queries(TEXTS), before, atol=1e-5)
    r.encode_queries_train(TEXTS[:2]).sum().backward()
    for name, p in r.query_encoder.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    with torch.no_grad():
        for name, p in r.query_encoder.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    # a trained adapter moves the queries, never the passage vectors the index holds
    assert np.abs(r.encode_queries(TEXTS) - before).max() > 1e-2
    np.testing.assert_array_equal(r.encode_passages(TEXTS), before)


def test_text_encoder_matches_sentence_transformers(tmp_path):
    """Reference check: fedrag_ray's encoder (no sentence_transformers import) gives the
    embeddings SentenceTransformer gives, for the default model and for a pipeline with
    CLS pooling and a Dense layer."""
    from sentence_transformers import SentenceTransformer, models

    from fedrag_ray.text_encoder import TextEncoder

    texts = [*TEXTS, "  padded   ", "A long passage about coronary arteries. " * 30]
    ref = SentenceTransformer(minilm_path(), device="cpu")
    ref.max_seq_length = 128
    want = ref.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    got = TextEncoder(minilm_path(), max_length=128).encode(texts, batch_size=2)
    np.testing.assert_allclose(got, want, atol=1e-5)

    torch.manual_seed(0)
    word = models.Transformer(minilm_path(), max_seq_length=64)
    pool = models.Pooling(word.get_word_embedding_dimension(), pooling_mode="cls")
    dense = models.Dense(384, 32, activation_function=torch.nn.Tanh())
    custom = SentenceTransformer(modules=[word, pool, dense, models.Normalize()], device="cpu")
    custom.save(str(tmp_path / "custom"))
    want = custom.encode(texts, convert_to_numpy=True)
    enc = TextEncoder(str(tmp_path / "custom"), max_length=64)
    assert enc.dim == 32 and enc.pooling == "cls"
    np.testing.assert_allclose(enc.encode(texts, batch_size=3), want, atol=1e-5)


def test_text_encoder_rejects_unknown_modules(tmp_path):
    import json
    import shutil

    from fedrag_ray.text_encoder import TextEncoder

    model = tmp_path / "m"
    shutil.copytree(minilm_path(), model)
    modules = json.loads((model / "modules.json").read_text())
    modules.insert(2, {"idx": 9, "name": "9", "path": "9_X", "type": "my_pkg.WeirdLayer"})
    (model / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="WeirdLayer"):
        TextEncoder(str(model), max_length=32)


def test_client_side_imports_stay_light():
    """A client actor imports fedrag_ray's client app, data, methods and retriever. They
    must not pull sentence_transformers / scikit-learn / pandas / datasets: that was
    ~230 MiB resident per actor process (benchmarks/peer_fedrag.py measures the sum)."""
    import subprocess
    import sys

    code = (
        "import sys, fedrag_ray.federated.client_app, fedrag_ray.rag, fedrag_ray.evaluate;"
        "heavy = [m for m in ('sentence_transformers', 'sklearn', 'pandas', 'datasets',"
        " 'pyarrow') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_frozen_retriever_keeps_one_encoder():
    r = BiEncoderRetriever(RetrieverConfig(train="none"))
    assert r.query_encoder is r.passage_encoder and not r.trains
    assert not _trainable(r.query_encoder)


# --------------------------------------------------------------------------- tiny generator


def test_tiny_generator_is_deterministic_in_seed(tmp_path):
    spec = TinyGeneratorSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    weights = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = build_tiny_generator(spec, seed, tmp_path / name)
        assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
        weights[name] = load_file(str(out / "model.safetensors"))
    assert weights["a"].keys() == weights["b"].keys()
    for k in weights["a"]:
        torch.testing.assert_close(weights["a"][k], weights["b"][k], rtol=0, atol=0)
    differ = [k for k in weights["a"] if not torch.equal(weights["a"][k], weights["c"][k])]
    assert any("proj" in k for k in differ)
    # idempotent: an existing directory is reused, not rebuilt
    stamp = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns
    build_tiny_generator(spec, 5, tmp_path / "a")
    assert (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == stamp
    assert tiny_generator_dir(spec, 0) == tiny_generator_dir(spec, 0)
    assert tiny_generator_dir(spec, 0) != tiny_generator_dir(spec, 1)
    assert tiny_generator_dir(spec, 0) != tiny_generator_dir(TinyGeneratorSpec(), 0)


def test_generator_built_into_temp_cache_with_seeded_lora(generator, fedrag_cache):
    spec = generator.cfg.tiny_spec
    assert tiny_generator_dir(spec, 0).is_relative_to(fedrag_cache)
    assert (tiny_generator_dir(spec, 0) / "config.json").exists()
    again = Generator(GeneratorConfig(model="tiny-random", max_length=64, autocast="none"))
    for (n1, p1), (n2, p2) in zip(
        generator.model.named_parameters(), again.model.named_parameters(), strict=True
    ):
        assert n1 == n2
        assert torch.equal(p1, p2), n1
    lora = _trainable(generator.model)
    assert lora and all("lora_" in n for n in lora)
    assert any("q_proj" in n for n in lora) and any("v_proj" in n for n in lora)
    assert generator.tokenizer.name_or_path.startswith(str(fedrag_cache))
    assert minilm_path()  # the offline MiniLM package provides the tokenizer


# --------------------------------------------------------------------------- RALT masking

PROMPTS = [
    "context: aspirin lowers fever in adults\nquestion: does aspirin help?\nanswer:",
    "question: ok?\nanswer:",
    "context: x y z\nquestion: what is the colour of the sky on a clear day?\nanswer:",
]
ANSWERS = ["yes", "no it is not", "blue"]


def _expected_rows(gen: Generator, prompts, answers):
    """(prompt ids, answer ids) built independently: WordPiece splits on whitespace, so
    the joint tokenization is prompt tokens + answer tokens; [CLS] first, [SEP] closes."""
    rows = []
    for p, a in zip(prompts, answers, strict=True):
        p_ids = gen.tokenizer(p, add_special_tokens=True)["input_ids"][:-1]  # [CLS] ... no [SEP]
        a_ids = gen.tokenizer(" " + a, add_special_tokens=False)["input_ids"] + [gen.end_id]
        rows.append((p_ids, a_ids))
    return rows


def test_encode_pairs_labels_only_answer_tokens(generator):
    ids, mask, pos, labels = generator.encode_pairs(PROMPTS, ANSWERS)
    expected = _expected_rows(generator, PROMPTS, ANSWERS)
    assert generator.prefix_ids == [generator.tokenizer.cls_token_id]
    width = max(len(p) + len(a) for p, a in expected)
    assert ids.shape == mask.shape == labels.shape == pos.shape == (3, width)
    pad = generator.tokenizer.pad_token_id
    for i, (p, a) in enumerate(expected):
        n = len(p) + len(a)
        lead = width - n  # left padding: every answer ends at the last position
        assert ids[i, lead:].tolist() == p + a
        assert mask[i, lead:].tolist() == [1] * n and mask[i, :lead].sum() == 0
        assert ids[i, :lead].tolist() == [pad] * lead
        assert pos[i, lead:].tolist() == list(range(n))  # positions start at 0 per row
        assert labels[i, : lead + len(p)].tolist() == [-100] * (lead + len(p))
        assert labels[i, lead + len(p) :].tolist() == a  # answer tokens + end-of-turn
        assert a[-1] == generator.end_id and len(a) >= 2


def test_encode_pairs_truncates_prompt_from_the_left(generator):
    short = copy.copy(generator)
    short.cfg = generator.cfg.model_copy(update={"max_length": 24})
    long_prompt = (
        "context: " + " ".join(f"word{i}" for i in range(60)) + "\nquestion: why?\nanswer:"
    )
    ids, mask, pos, labels = short.encode_pairs([long_prompt], ["because"])
    ((p, a),) = _expected_rows(generator, [long_prompt], ["because"])
    assert ids.shape[1] == 24
    assert ids[0].tolist() == p[-(24 - len(a)) :] + a  # the question end of the prompt survives
    assert (labels[0] != -100).sum() == len(a)


def _hand_loss(gen: Generator, prompts, answers) -> torch.Tensor:
    """Cross entropy over answer positions only, from each row's full unpadded logits
    (no logits_to_keep, no padding), in float64."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for p, a in _expected_rows(gen, prompts, answers):
        ids = torch.tensor([p + a])
        with torch.no_grad():
            logits = gen.model(input_ids=ids).logits.double()[0]
        for j, tok in enumerate(a):
            row = logits[len(p) + j - 1]  # the answer token at len(p)+j is predicted there
            total += torch.logsumexp(row, 0) - row[tok]
            count += 1
    return total / count


def test_loss_equals_hand_computed_answer_only_cross_entropy(generator):
    gen = copy.deepcopy(generator)
    # move LoRA B off zero so the adapters take part in the check
    with torch.no_grad():
        for name, p in gen.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    gen.model.eval()
    with torch.no_grad():
        loss = gen.loss(PROMPTS, ANSWERS)
    hand = _hand_loss(gen, PROMPTS, ANSWERS)
    assert float(loss) == pytest.approx(float(hand), rel=1e-5)
    # the mask matters: a loss over every token is a different number
    ids, mask, pos, _ = gen.encode_pairs(PROMPTS, ANSWERS)
    with torch.no_grad():
        full = gen.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            labels=ids.masked_fill(mask == 0, -100),
        ).loss
    assert abs(float(full) - float(hand)) > 1e-3
    # answer_logprobs: per-example sums that add back up to the same mean
    with torch.no_grad():
        logp, n = gen.answer_logprobs(PROMPTS, ANSWERS)
    assert n.tolist() == [len(a) for _, a in _expected_rows(gen, PROMPTS, ANSWERS)]
    assert float(-logp.sum() / n.sum()) == pytest.approx(float(hand), rel=1e-5)


def test_answer_logprobs_do_not_depend_on_batch_padding(generator):
    generator.model.eval()
    with torch.no_grad():
        batched, _ = generator.answer_logprobs(PROMPTS, ANSWERS)
        single = torch.cat(
            [generator.answer_logprobs([p], [a])[0] for p, a in zip(PROMPTS, ANSWERS, strict=True)]
        )
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-5)


def test_generate_after_fitting_reproduces_answers(generator):
    gen = copy.deepcopy(generator)
    opt = torch.optim.AdamW(_trainable(gen.model).values(), lr=2e-2)
    for _ in range(30):
        gen.model.train()
        loss = gen.loss(PROMPTS, ANSWERS)
        opt.zero_grad()
        loss.backward()
        opt.step()
    batched = gen.generate(PROMPTS, max_new_tokens=6)  # left-padded batch
    assert batched == ANSWERS
    assert [gen.generate([p], max_new_tokens=6)[0] for p in PROMPTS] == ANSWERS


# --------------------------------------------------------------------------- QLoRA on CPU


def _qlora_train_check(gen: Generator, steps: int = 8) -> None:
    lora = _trainable(gen.model)
    assert lora and all("lora_" in n for n in lora)
    before = {n: p.detach().clone() for n, p in lora.items()}
    opt = torch.optim.AdamW(lora.values(), lr=1e-2)
    losses = []
    for step in range(steps):
        gen.model.train()
        loss = gen.loss(PROMPTS, ANSWERS)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad for n, p in lora.items()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        b_norm = sum(float(g.abs().sum()) for n, g in grads.items() if "lora_B" in n)
        assert b_norm > 0
        if step == 1:  # once B has moved off zero, A receives gradient too
            assert sum(float(g.abs().sum()) for n, g in grads.items() if "lora_A" in n) > 0
        opt.step()
        losses.append(float(loss.detach()))
    changed = [n for n, p in lora.items() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(lora)
    assert losses[-1] < losses[0] - 0.05, losses


def test_qlora_4bit_nf4_trains_on_cpu():
    import bitsandbytes as bnb

    gen = Generator(GeneratorConfig(model="tiny-random", quantization="4bit", max_length=64))
    base = gen.model.get_base_model()
    layer = base.model.layers[0]
    quantized = [
        layer.self_attn.q_proj.base_layer,
        layer.self_attn.v_proj.base_layer,
        layer.self_attn.k_proj,
        layer.self_attn.o_proj,
        layer.mlp.gate_proj,
        layer.mlp.up_proj,
        layer.mlp.down_proj,
    ]
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in quantized)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in quantized)
    assert quantized[0].weight.dtype == torch.uint8
    frozen = {id(m): m.weight.detach().clone() for m in quantized}
    _qlora_train_check(gen)
    for m in quantized:  # the 4-bit base never changes
        assert torch.equal(m.weight.detach(), frozen[id(m)])


def test_qlora_8bit_trains_on_cpu():
    """bitsandbytes 0.50 has a CPU path for LLM.int8 (MatMul8bitLt casts to fp16 and runs
    the int8 matmul in torch), so 8-bit QLoRA works on CPU, just without speed gains."""
    import bitsandbytes as bnb

    gen = Generator(GeneratorConfig(model="tiny-random", quantization="8bit", max_length=64))
    layer = gen.model.get_base_model().model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base_layer, bnb.nn.Linear8bitLt)
    assert isinstance(layer.mlp.down_proj, bnb.nn.Linear8bitLt)
    assert layer.mlp.down_proj.weight.dtype == torch.int8
    frozen = layer.mlp.down_proj.weight.detach().clone()
    _qlora_train_check(gen)
    assert torch.equal(layer.mlp.down_proj.weight.detach(), frozen)


# --------------------------------------------------------------------------- devices


def test_device_and_compute_dtype_resolution():
    """CPU-side logic of device placement; the CUDA path itself is
    test_generator_real.test_generator_and_retriever_move_to_cuda (needs a GPU)."""
    from fedrag_ray.generator import compute_dtype, cpu_has_fast_bf16, resolve_device

    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")
    assert compute_dtype(GeneratorConfig(autocast="none"), cpu) is None
    assert compute_dtype(GeneratorConfig(autocast="bfloat16"), cpu) == torch.bfloat16
    expected = torch.bfloat16 if cpu_has_fast_bf16() else None
    assert compute_dtype(GeneratorConfig(autocast="auto"), cpu) == expected


def test_generator_runs_under_bf16_autocast(generator):
    """bf16 autocast (the default where the CPU has it): finite loss and gradients, LoRA
    factors stay float32, log-probs close to float32 ones."""
    gen = copy.deepcopy(generator)
    gen.autocast_dtype = torch.bfloat16
    gen.model.train()
    loss = gen.loss(PROMPTS, ANSWERS)
    loss.backward()
    lora = _trainable(gen.model)
    assert all(p.dtype == torch.float32 for p in lora.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())
    gen.model.eval()
    with torch.no_grad():
        bf, _ = gen.answer_logprobs(PROMPTS, ANSWERS)
        gen.autocast_dtype = None
        fp, _ = gen.answer_logprobs(PROMPTS, ANSWERS)
    torch.testing.assert_close(bf, fp, atol=0.15, rtol=0.02)


def _hub_cache_copy(cache, repo: str, model_dir, drop: tuple[str, ...]):
    """A Hugging Face hub cache holding ``repo`` as a snapshot of ``model_dir`` without
    the files in ``drop`` (as after a download that never fetched them)."""
    import shutil

    commit = "0" * 40
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    shutil.copytree(model_dir, snap, ignore=shutil.ignore_patterns(*drop))
    return repo_dir, commit


def test_text_encoder_does_not_mean_pool_a_hub_model_whose_pipeline_it_cannot_read(
    tmp_path, monkeypatch
):
    """A CLS-pooling hub model whose ``modules.json`` is not in the (offline) cache used
    to be read as "no sentence-transformers pipeline" and silently mean-pooled: any error
    fetching a file counted as "file missing". Now only a file the hub says does not
    exist counts as missing; anything else is an error naming the file."""
    import json

    from huggingface_hub import constants

    from fedrag_ray.text_encoder import TextEncoder

    model = tmp_path / "cls_model"
    import shutil

    shutil.copytree(minilm_path(), model)
    (model / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 384, "pooling_mode": "cls"})
    )
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _hub_cache_copy(cache, "acme/cls-encoder", model, ("modules.json",))
    with pytest.raises(ValueError, match="acme/cls-encoder.*modules.json"):
        TextEncoder("acme/cls-encoder", max_length=32)

    # a file the hub said does not exist (its cached "no exist" marker) is missing: a
    # plain encoder, mean-pooled
    repo_dir, commit = _hub_cache_copy(cache, "acme/plain", model, ("modules.json", "1_*"))
    (repo_dir / ".no_exist" / commit).mkdir(parents=True)
    (repo_dir / ".no_exist" / commit / "modules.json").touch()
    (repo_dir / ".no_exist" / commit / "sentence_bert_config.json").touch()
    assert TextEncoder("acme/plain", max_length=32).pooling == "mean"
