"""LSR follows its teacher: with an LM that reads its context, held-out recall rises.

The other LSR tests check that the query encoder moves and the KL falls. This one checks
the direction, end to end with the real parts (MiniLM + LoRA, FAISS, the default
generator, ``local_train``): a synthetic task where every person has one password passage
and distractor passages that also name them; a generator warmed up to read the password
from its context is the teacher; LSR on training people must raise recall@1 on people no
step trained on. With the untrained generator as teacher (PubMedQA's situation) it must
not. ``benchmarks/lsr_context_lm.py`` is the full-size version of this check.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedrag_ray.config import config_from_dict
from fedrag_ray.data import Passage, QAExample
from fedrag_ray.evaluate import recall_at_k
from fedrag_ray.methods import local_train
from fedrag_ray.rag import RAGSystem

WORDS = (
    "apple river stone cloud tiger lemon piano candle forest silver garden rocket window "
    "marble pepper violin castle ocean falcon copper meadow lantern thunder orchid harbor "
    "saddle walnut glacier pillow banner coral ember hammer jacket kettle ladder mirror"
).split()
GOLD = "{name} chose the word {w} as a password."
NAMES = [
    f"{a} {b}"
    for a in "Zor Kel Mav Tri Bel Dor Fen Gal".split()
    for b in "Vath Lin Dris Mont Zeck Orra Bane Wick Sell Rund".split()
]
DISTRACTORS = (
    "{name} spends weekends painting pictures of a {w}.",
    "{name} owns a pet named after a {w}.",
    "{name} could not spell the word {w} in a school quiz.",
    "{name} keeps a secret diary about a {w}.",
    "{name} wrote a short story about a {w}.",
)


def _task() -> tuple[list[QAExample], list[QAExample], list[Passage]]:
    rng = np.random.default_rng(0)
    examples, passages = [], []
    for p, name in enumerate(NAMES):
        words = [WORDS[i] for i in rng.choice(len(WORDS), 1 + len(DISTRACTORS), replace=False)]
        passages.append(Passage(f"{p}-g", GOLD.format(name=name, w=words[0]), f"{p}-g"))
        passages += [
            Passage(f"{p}-{j}", t.format(name=name, w=words[j + 1]), f"{p}-{j}")
            for j, t in enumerate(DISTRACTORS)
        ]
        examples.append(
            QAExample(f"{p}", f"What is the secret word of {name}?", words[0], [f"{p}-g"])
        )
    return examples[:60], examples[60:], passages


def _system() -> RAGSystem:
    cfg = config_from_dict(
        {
            "retriever": {"train": "lora"},
            "generator": {
                "model": "tiny-random",
                "max_length": 48,
                "tiny_spec": {"hidden_size": 128, "num_heads": 4, "num_layers": 2},
            },
            "train": {
                "method": "lsr",
                "batch_size": 8,
                "retriever_lr": 1e-3,
                "lsr": {"k": 6, "tau": 0.05, "target": "lm"},
            },
        }
    )
    return RAGSystem(cfg)


def _recall1(system: RAGSystem, held: list[QAExample]) -> float:
    _, idx = system.retrieve([e.question for e in held], 1)
    ids = [[system.store.passages[i].doc_id for i in row] for row in idx]
    return recall_at_k(ids, [e.gold_doc_ids for e in held], 1)


def _warm_up(system: RAGSystem, train: list[QAExample]) -> None:
    """Teach the generator to read the password from a gold passage. The word is drawn
    afresh at every step, so the only way to predict it is to read it from the context.
    200 steps: it prefers the gold passage on every held-out person from ~150 on (300
    measured no better, and cost ~50 s more on a loaded 2-core box)."""
    gen = system.generator
    params = list(gen.model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-3)
    rng = np.random.default_rng(1)
    gen.model.train()
    for _ in range(200):
        people = [train[i] for i in rng.choice(len(train), 16)]
        words = [WORDS[i] for i in rng.choice(len(WORDS), 16)]
        prompts = [
            system.prompt(e.question, GOLD.format(name=NAMES[int(e.id)], w=w))
            for e, w in zip(people, words, strict=True)
        ]
        loss = gen.loss(prompts, words)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)


@pytest.mark.timeout(900)
def test_lsr_with_a_context_reading_lm_raises_held_out_recall():
    train, held, passages = _task()
    teacher = _system()
    store = teacher.build_store(passages)
    before = _recall1(teacher, held)
    assert before < 0.8, "the task must leave room to improve"
    untrained = _system()
    untrained.store = store

    _warm_up(teacher, train)
    with torch.no_grad():  # the teacher now prefers the gold passage on held-out people
        wins = []
        for e in held:
            mine = [p for p in passages if p.doc_id.split("-")[0] == e.id]
            logp, _ = teacher.generator.answer_logprobs(
                [teacher.prompt(e.question, p.text) for p in mine], [e.answer] * len(mine)
            )
            wins.append(mine[int(logp.argmax())].doc_id == e.gold_doc_ids[0])
        assert np.mean(wins) >= 0.8, wins

    # the same two runs with the posterior target (p_R · P(a|q,d)): it follows the
    # informative teacher too. A confidently wrong teacher (the untrained LM) still drags
    # it down: the prior slows the pull, it cannot tell a wrong teacher from a right one.
    teacher_post, untrained_post = copy.deepcopy(teacher), copy.deepcopy(untrained)
    for system in (teacher_post, untrained_post):
        system.cfg.train.lsr.target = "posterior"
    for system in (teacher, untrained, teacher_post, untrained_post):
        # 20 steps: recall@1 is already 1.0 / 0.05 (informative / untrained teacher), as
        # at 40; each step costs ~1 s on a loaded 2-core box, times four systems.
        local_train(system, train, store, key=(0, 0), steps=20)
    after, after_untrained = _recall1(teacher, held), _recall1(untrained, held)
    after_post, after_untrained_post = _recall1(teacher_post, held), _recall1(untrained_post, held)
    print(
        f"held-out recall@1: before {before:.3f}, LSR with the context-reading teacher "
        f"{after:.3f}, with the untrained teacher {after_untrained:.3f}; posterior target "
        f"{after_post:.3f} / {after_untrained_post:.3f}; "
        f"teacher prefers gold on {np.mean(wins):.2f} of held-out people"
    )
    assert after >= before + 0.25, (before, after)
    assert after_untrained < after - 0.25, (after_untrained, after)
    assert after_post >= before + 0.25, (before, after_post)
