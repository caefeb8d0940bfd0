"""RA-DIT objectives on the real models: LSR trains only the query encoder and matches a
hand-computed KL, RALT trains only the generator's LoRA, ``both`` alternates, FedProx
pulls toward the anchor. Each training run happens once (module fixtures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrag_ray.methods import batches_for, local_train, lsr_distributions, lsr_loss, ralt_loss


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _l2_diff(module: torch.nn.Module, snap: dict[str, torch.Tensor], lora_only=None) -> float:
    total = 0.0
    for n, p in module.named_parameters():
        if lora_only is not None and (("lora_" in n) != lora_only):
            continue
        total += float(((p.detach() - snap[n]) ** 2).sum())
    return total**0.5


def _first_vs_last(losses: list[float], n: int = 2) -> tuple[float, float]:
    return float(np.mean(losses[:n])), float(np.mean(losses[-n:]))


@pytest.fixture(scope="module")
def examples(small_corpus):
    return small_corpus[0]


# --------------------------------------------------------------------------- LSR


def test_lsr_distributions_and_kl_by_hand(make_system, examples, small_store):
    system = make_system(
        **{"train.method": "lsr", "train.lsr.k": 4, "train.lsr.tau": 0.1, "train.lsr.target": "lm"}
    )
    batch = examples[:3]
    torch.manual_seed(0)  # same dropout mask in both calls below
    log_p_r, log_p_lm, valid = lsr_distributions(system, batch, small_store)
    assert bool(valid.all())  # exact index: k real hits
    assert log_p_r.shape == log_p_lm.shape == (3, 4)
    assert log_p_r.grad_fn is not None and log_p_r.requires_grad
    assert log_p_lm.grad_fn is None and not log_p_lm.requires_grad
    torch.testing.assert_close(log_p_r.exp().sum(-1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(log_p_lm.exp().sum(-1), torch.ones(3), atol=1e-5, rtol=0)

    torch.manual_seed(0)
    loss = lsr_loss(system, batch, small_store)
    lp_r, lp_lm = log_p_r.detach(), log_p_lm
    hand = (lp_lm.exp() * (lp_lm - lp_r)).sum(-1).mean()  # KL(p_LM || p_R), mean over questions
    assert float(loss.detach()) == pytest.approx(float(hand), rel=1e-5, abs=1e-7)
    reverse = (lp_r.exp() * (lp_r - lp_lm)).sum(-1).mean()
    assert abs(float(reverse) - float(hand)) > 1e-6  # the direction is actually tested
    loss.backward()
    assert any(p.grad is not None for p in system.retriever.query_encoder.parameters())
    assert all(p.grad is None for p in system.generator.model.parameters())

    # p_LM is softmax over the LM's answer log-likelihood given each retrieved passage
    torch.manual_seed(0)
    q = system.retriever.encode_queries_train([ex.question for ex in batch])
    _, idx = small_store.search(q.detach().numpy(), 4)
    prompts = [
        system.prompt(ex.question, small_store.passages[i].text, system.answer_reserve(ex.answer))
        for ex, row in zip(batch, idx, strict=True)
        for i in row
    ]
    answers = [ex.answer for ex in batch for _ in range(4)]
    with torch.no_grad():
        lm, _ = system.generator.answer_logprobs(prompts, answers)
    torch.testing.assert_close(log_p_lm, torch.log_softmax(lm.view(3, 4), -1), atol=1e-5, rtol=0)
    sims = q.detach() @ torch.from_numpy(small_store.embeddings[idx].reshape(12, -1)).T
    sims = sims.view(3, 3, 4)[torch.arange(3), torch.arange(3)]  # (question i, its passages)
    torch.testing.assert_close(
        log_p_r.detach(), torch.log_softmax(sims / 0.1, -1), atol=1e-4, rtol=0
    )


@pytest.fixture(scope="module")
def lsr_run(retriever, generator, small_store, examples):
    import copy

    from fedrag_ray.config import config_from_dict
    from fedrag_ray.rag import RAGSystem

    cfg = config_from_dict(
        {
            "generator": {"model": "tiny-random", "max_length": 64},
            "train": {
                "method": "lsr",
                "batch_size": 4,
                "retriever_lr": 1e-4,
                "lsr": {"k": 4, "target": "lm"},
            },
        }
    )
    system = RAGSystem(
        cfg,
        retriever=copy.deepcopy(retriever),
        generator=copy.deepcopy(generator),
        store=small_store,
    )
    snaps = {
        "query": _snapshot(system.retriever.query_encoder),
        "passage": _snapshot(system.retriever.passage_encoder),
        "generator": _snapshot(system.generator.model),
        "store": small_store.embeddings.copy(),
    }
    assert set(system.trainable_modules()) == {"retriever"}
    result = local_train(system, examples[:4], small_store, key=(0, 0), steps=10)
    return system, snaps, result


def test_lsr_updates_only_the_query_encoder(lsr_run, small_store):
    system, snaps, result = lsr_run
    assert result.steps == 10 and result.num_examples == 40
    assert _l2_diff(system.retriever.query_encoder, snaps["query"]) > 0
    assert _l2_diff(system.retriever.passage_encoder, snaps["passage"]) == 0
    assert _l2_diff(system.generator.model, snaps["generator"]) == 0
    np.testing.assert_array_equal(small_store.embeddings, snaps["store"])


def test_lsr_loss_falls_on_a_fixed_batch(lsr_run):
    _, _, result = lsr_run
    losses = result.losses
    assert all(np.isfinite(losses)) and min(losses) >= -1e-6  # a KL divergence
    first, last = _first_vs_last(losses)
    assert last < 0.7 * first, losses


# --------------------------------------------------------------------------- RALT


def test_ralt_loss_pairs_each_passage_separately(make_system, examples, small_store):
    system = make_system(**{"train.method": "ralt", "train.ralt.k": 3})
    batch = examples[:2]
    with torch.no_grad():
        loss = ralt_loss(system, batch, small_store)
        _, idx = system.retrieve([ex.question for ex in batch], 3)
        prompts = [
            system.prompt(
                ex.question, small_store.passages[i].text, system.answer_reserve(ex.answer)
            )
            for ex, row in zip(batch, idx, strict=True)
            for i in row
        ]
        expected = system.generator.loss(prompts, [ex.answer for ex in batch for _ in range(3)])
    assert len(prompts) == 6
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


@pytest.fixture(scope="module")
def ralt_run(retriever, generator, small_store, examples):
    import copy

    from fedrag_ray.config import config_from_dict
    from fedrag_ray.rag import RAGSystem

    cfg = config_from_dict(
        {
            "generator": {"model": "tiny-random", "max_length": 64},
            "train": {"method": "ralt", "batch_size": 4, "lr": 5e-3},
        }
    )
    system = RAGSystem(
        cfg,
        retriever=copy.deepcopy(retriever),
        generator=copy.deepcopy(generator),
        store=small_store,
    )
    snaps = {
        "query": _snapshot(system.retriever.query_encoder),
        "generator": _snapshot(system.generator.model),
    }
    seen = []
    result = local_train(
        system,
        examples[:4],
        small_store,
        key=(0, 0),
        steps=10,
        on_step=lambda s, loss: seen.append((s, loss)),
    )
    return system, snaps, result, seen


def test_ralt_loss_falls_and_only_generator_lora_changes(ralt_run):
    system, snaps, result, seen = ralt_run
    assert set(system.trainable_modules()) == {"generator"}
    assert seen == list(enumerate(result.losses)) and result.seconds > 0
    first, last = _first_vs_last(result.losses)
    assert last < first - 0.2, result.losses
    assert _l2_diff(system.generator.model, snaps["generator"], lora_only=True) > 0
    assert _l2_diff(system.generator.model, snaps["generator"], lora_only=False) == 0
    assert _l2_diff(system.retriever.query_encoder, snaps["query"]) == 0
    changed = {
        n
        for n, p in system.generator.model.named_parameters()
        if not torch.equal(p, snaps["generator"][n])
    }
    assert changed == {n for n, p in system.generator.model.named_parameters() if p.requires_grad}


def test_trainable_state_round_trip(ralt_run, make_system):
    trained, _, _, _ = ralt_run
    state = trained.trainable_state()
    assert state and all(k.startswith("generator.") and "lora_" in k for k in state)
    fresh = make_system(**{"train.method": "ralt"})
    assert any(not np.array_equal(v, state[k]) for k, v in fresh.trainable_state().items())
    fresh.load_trainable_state(state)
    after = fresh.trainable_state()
    assert all(np.array_equal(after[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="mismatch"):
        fresh.load_trainable_state({k: v for k, v in list(state.items())[1:]})


# --------------------------------------------------------------------------- both


def test_both_alternate_trains_generator_then_retriever(make_system, examples, small_store):
    system = make_system(**{"train.method": "both", "train.retriever_lr": 1e-4, "train.lsr.k": 3})
    assert set(system.trainable_modules()) == {"generator", "retriever"}
    q0 = _snapshot(system.retriever.query_encoder)
    g0 = _snapshot(system.generator.model)
    moved = []

    def record(step, _loss):
        moved.append(
            (
                _l2_diff(system.generator.model, g0, lora_only=True) > 0,
                _l2_diff(system.retriever.query_encoder, q0) > 0,
            )
        )

    local_train(system, examples[:4], small_store, key=(0, 0), steps=2, on_step=record)
    # step 0 is RALT (generator only), step 1 is LSR (adds the query encoder)
    assert moved == [(True, False), (True, True)]


def test_both_alternate_counts_the_global_step_across_calls(make_system, examples, small_store):
    """With one local step per round (a federated client with ``local_steps: 1``), round
    1's step is RALT and round 2's is LSR: the alternation follows the global step, not a
    counter that restarts in every call."""
    system = make_system(**{"train.method": "both", "train.retriever_lr": 1e-4, "train.lsr.k": 3})
    q0 = _snapshot(system.retriever.query_encoder)
    g0 = _snapshot(system.generator.model)
    first = local_train(system, examples[:4], small_store, key=(0, 0), steps=1, start_step=0)
    assert (first.ralt_steps, first.lsr_steps) == (1, 0)
    assert _l2_diff(system.generator.model, g0, lora_only=True) > 0
    assert _l2_diff(system.retriever.query_encoder, q0) == 0
    g1 = _snapshot(system.generator.model)
    second = local_train(system, examples[:4], small_store, key=(0, 1), steps=1, start_step=1)
    assert (second.ralt_steps, second.lsr_steps) == (0, 1)
    assert _l2_diff(system.retriever.query_encoder, q0) > 0
    assert _l2_diff(system.generator.model, g1, lora_only=True) == 0


def test_lsr_posterior_target_multiplies_in_the_retriever(make_system, examples, small_store):
    """``lsr.target: posterior`` is p_R(d|q)·P(a|q,d)^(1/β) renormalised; a teacher that
    cannot tell the passages apart (β huge) then gives KL ≈ 0, where REPLUG's target pulls
    the retriever toward uniform."""
    system = make_system(**{"train.method": "lsr", "train.lsr.k": 4, "train.lsr.target": "lm"})
    batch = examples[:3]
    torch.manual_seed(0)
    log_p_r, log_p_lm, _ = lsr_distributions(system, batch, small_store)
    system.cfg.train.lsr.target = "posterior"
    torch.manual_seed(0)
    log_p_r2, log_post, _ = lsr_distributions(system, batch, small_store)
    torch.testing.assert_close(log_p_r2.detach(), log_p_r.detach())
    hand = torch.log_softmax(log_p_lm + log_p_r.detach(), dim=-1)
    torch.testing.assert_close(log_post, hand, atol=1e-5, rtol=0)
    assert log_post.grad_fn is None

    system.cfg.train.lsr.beta = 1e6  # P(a|q,d)^(1/β) ≈ 1 for every passage
    torch.manual_seed(0)
    flat_posterior = float(lsr_loss(system, batch, small_store).detach())
    system.cfg.train.lsr.target = "lm"
    torch.manual_seed(0)
    flat_replug = float(lsr_loss(system, batch, small_store).detach())
    assert abs(flat_posterior) < 1e-5
    assert flat_replug > 1e-3  # KL(uniform || p_R): the flattening pull


def test_lsr_masks_ann_misses(make_system, examples, retriever, small_store):
    """An IVF index probing one small list returns fewer than k hits (index -1): those
    entries drop out of p_R and p_LM (no crash, no passage -1 scored) and the KL runs
    over the real hits only."""
    from fedrag_ray.knowledge_store import KnowledgeStore

    store = KnowledgeStore(retriever.dim, "ivf", nlist=3, nprobe=1)  # ~45 per list
    store.add(small_store.passages, small_store.embeddings)
    store.build()
    system = make_system(**{"train.method": "lsr", "train.lsr.k": 100})  # > a list
    batch = examples[:4]
    torch.manual_seed(0)
    log_p_r, log_p_lm, valid = lsr_distributions(system, batch, store)
    assert (~valid).any() and (valid.sum(1) >= 2).all()
    assert torch.isinf(log_p_r[~valid]).all() and torch.isinf(log_p_lm[~valid]).all()
    torch.testing.assert_close(log_p_r.exp().sum(-1), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(log_p_lm.exp().sum(-1), torch.ones(4), atol=1e-5, rtol=0)
    torch.manual_seed(0)
    loss = lsr_loss(system, batch, store)
    hand = torch.stack(
        [
            (
                log_p_lm[b][valid[b]].exp()
                * (log_p_lm[b][valid[b]] - log_p_r[b][valid[b]].detach())
            ).sum()
            for b in range(4)
        ]
    ).mean()
    assert torch.isfinite(loss) and float(loss.detach()) == pytest.approx(
        float(hand), rel=1e-5, abs=1e-7
    )
    loss.backward()
    grads = [p.grad for p in system.retriever.query_encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_lr_schedule_warmup_then_cosine():
    from fedrag_ray.config import TrainConfig
    from fedrag_ray.methods import lr_factor

    cfg = TrainConfig(warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, 10, cfg) for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False))  # non-increasing
    assert f[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 7 / 8)))
    lin = TrainConfig(lr_schedule="linear", min_lr_ratio=0.0)
    assert [lr_factor(s, 4, lin) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_factor(7, 10, TrainConfig(lr_schedule="constant")) == 1.0


def test_one_optimizer_spans_calls(make_system, examples, small_store):
    """The centralized loop passes one AdamW (and schedule) to every epoch: its state
    counts all steps, and the LR continues the schedule instead of restarting."""
    from fedrag_ray.methods import make_optimizer, make_scheduler

    system = make_system(**{"train.method": "ralt", "train.warmup_steps": 2})
    opt = make_optimizer(system)
    sched = make_scheduler(opt, system.cfg.train, total_steps=4)
    a = local_train(
        system, examples[:8], small_store, key=(0, 0), steps=2, optimizer=opt, scheduler=sched
    )
    b = local_train(
        system,
        examples[:8],
        small_store,
        key=(0, 1),
        steps=2,
        optimizer=opt,
        scheduler=sched,
        start_step=2,
    )
    lr = system.cfg.train.lr
    assert a.lrs == pytest.approx([0.5 * lr, lr])
    # step 2 enters the decay at its start (not a second warmup), then it decays
    assert b.lrs[0] == pytest.approx(lr) and b.lrs[1] < b.lrs[0]
    p = opt.param_groups[0]["params"][0]
    assert int(opt.state[p]["step"]) == 4


def test_both_combined_trains_both_in_one_step(make_system, examples, small_store):
    system = make_system(
        **{"train.method": "both", "train.both_mode": "combined", "train.lsr.k": 3}
    )
    q0 = _snapshot(system.retriever.query_encoder)
    g0 = _snapshot(system.generator.model)
    local_train(system, examples[:4], small_store, key=(0, 0), steps=1)
    assert _l2_diff(system.generator.model, g0, lora_only=True) > 0
    assert _l2_diff(system.retriever.query_encoder, q0) > 0


# --------------------------------------------------------------------------- FedProx


def test_fedprox_stays_closer_to_the_anchor(make_system, examples, small_store):
    distances, losses = {}, {}
    for mu in (0.0, 10.0):
        system = make_system(**{"train.method": "ralt", "train.lr": 5e-3})
        anchor = system.trainable_state()
        result = local_train(system, examples[:8], small_store, key=(0, 0), steps=4, proximal_mu=mu)
        now = system.trainable_state()
        distances[mu] = float(np.sqrt(sum(((now[k] - anchor[k]) ** 2).sum() for k in now)))
        losses[mu] = result.losses
    assert distances[10.0] > 0
    assert distances[10.0] < 0.5 * distances[0.0], distances
    # the first step starts at the anchor, where the proximal term and its gradient are 0
    assert losses[10.0][0] == pytest.approx(losses[0.0][0], rel=1e-6)


# --------------------------------------------------------------------------- batching


def test_batches_for_epochs_and_steps():
    one = batches_for(10, 4, seed=0, key=(0, 0), epochs=1, steps=None)
    assert [len(b) for b in one] == [4, 4, 2]
    assert sorted(np.concatenate(one).tolist()) == list(range(10))
    two = batches_for(10, 4, seed=0, key=(0, 0), epochs=2, steps=None)
    assert len(two) == 6 and all(np.array_equal(a, b) for a, b in zip(one, two[:3], strict=True))
    assert not np.array_equal(np.concatenate(two[:3]), np.concatenate(two[3:]))
    stepped = batches_for(10, 4, seed=0, key=(0, 0), epochs=1, steps=5)
    assert len(stepped) == 5
    again = batches_for(10, 4, seed=0, key=(0, 0), epochs=1, steps=5)
    assert all(np.array_equal(a, b) for a, b in zip(stepped, again, strict=True))
    other = batches_for(10, 4, seed=0, key=(3, 0), epochs=1, steps=None)
    assert not np.array_equal(np.concatenate(other), np.concatenate(one))


@pytest.mark.timeout(10)
def test_batches_for_an_empty_client_returns_no_batches():
    """A client with no questions (reachable through local_train: a skewed partition)
    gets no batches, whether counted in epochs or steps; it used to loop forever with
    ``steps``, because no epoch of an empty set ever adds a batch."""
    assert batches_for(0, 4, seed=0, key=(0, 0), epochs=1, steps=3) == []
    assert batches_for(0, 4, seed=0, key=(0, 0), epochs=2, steps=None) == []
