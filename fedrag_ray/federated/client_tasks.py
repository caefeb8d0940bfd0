"""What a client actor does with each message: one handler per task, message in, reply out.

``client_app`` routes a message here; the handlers hold no state of their own (the
actor's models, data and store caches are its :class:`~.client_runtime.ClientRuntime`).

- :func:`train`: one virtual client's local round (``MessageType.TRAIN``); with
  ``federation.client_step: noop`` :func:`train_noop` replies without model work (engine
  measurements).
- Model work on behalf of the server (``MessageType.EVALUATE``, named by
  ``protocol.TASK_KEY``), so the driver never loads a model: :func:`prepare` builds the
  global index if missing and returns the initial trainable arrays; :func:`evaluate`
  scores the global arrays on the server's held-out questions against the global store;
  :func:`retrieve` and :func:`answer` are federated retrieval at inference
  (``federated_retrieval``).

Model code is imported inside the handlers only. Every record key is ``protocol``'s.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedrag_ray.federated.client_runtime import node_tag
from fedrag_ray.federated.faults import ENV_VAR as FAULTS_ENV
from fedrag_ray.federated.faults import Faults, parse_faults
from fedrag_ray.federated.params import from_record, record_nbytes, to_record
from fedrag_ray.federated.protocol import (
    ACTOR_CLIENTS_SERVED_KEY,
    ACTOR_NODE_KEY,
    ACTOR_PID_KEY,
    ANSWER_KEY,
    ANSWER_TEXT_KEY,
    ARRAYS_KEY,
    BYTES_RECEIVED_KEY,
    BYTES_SENT_KEY,
    CONFIG_KEY,
    EXAMPLE_IDS_KEY,
    FULL_MODEL_BYTES_KEY,
    HIT_COUNTS_KEY,
    HIT_DOC_IDS_KEY,
    HIT_IDS_KEY,
    HIT_SCORES_KEY,
    HIT_TEXTS_KEY,
    HITS_KEY,
    INDEX_SECONDS_KEY,
    K_KEY,
    LOCAL_STEPS_KEY,
    LR_KEY,
    LSR_STEPS_KEY,
    METRICS_KEY,
    NUM_PASSAGES_KEY,
    PARTITION_KEY,
    PASSAGES_KEY,
    PASSAGES_USED_KEY,
    PROXIMAL_MU_KEY,
    QUESTION_KEY,
    QUESTIONS_KEY,
    RALT_STEPS_KEY,
    SCHEDULE_ROUNDS_KEY,
    SCOPE_KEY,
    SERVER_ROUND_KEY,
    STEPS_KEY,
    TRAIN_LOSS_KEY,
    TRAIN_SECONDS_KEY,
    TRAIN_TOKENS_KEY,
    WEIGHT_KEY,
)
from fedrag_ray.federated.sampling import decode_example_ids
from fedrag_ray.runtime import release_free_memory

if TYPE_CHECKING:
    from fedrag_ray.federated.client_runtime import ClientRuntime


def _faults() -> Faults:
    """The chaos knob, read per message (see ``faults``): raise/kill/nan/shape/scale/signflip."""
    return parse_faults(os.environ.get(FAULTS_ENV, ""))


def _load_sent_arrays(rt: ClientRuntime, msg: Message) -> None:
    """The server's arrays into the actor's system, when the message carries them."""
    if ARRAYS_KEY in msg.content:
        rt.system.load_trainable_state(from_record(msg.content[ARRAYS_KEY]))


# --------------------------------------------------------------------------- train


def train_ids(msg: Message) -> list[int]:
    """The client's question indices (computed on the driver, ``sampling``)."""
    config = msg.content[CONFIG_KEY]
    if EXAMPLE_IDS_KEY not in config:
        raise ValueError(f"train message without {EXAMPLE_IDS_KEY!r} (see protocol.py)")
    return decode_example_ids(config[EXAMPLE_IDS_KEY])


def inject_faults(pid: int, server_round: int, faults: Faults) -> None:
    """``FEDRAG_RAY_FAULTS``: raise in this partition, or exit this actor hard this round."""
    if pid in faults.raise_on:
        raise RuntimeError(f"injected fault in partition {pid}")
    if faults.kill_on.get(pid) == server_round:
        os._exit(1)  # simulate a crashed actor process


def train_noop(pid: int, msg: Message, started: float) -> Message:
    """Engine measurements: no model work, the arrays go back as they came."""
    inject_faults(pid, int(msg.content[CONFIG_KEY][SERVER_ROUND_KEY]), _faults())
    metrics = MetricRecord(
        {
            WEIGHT_KEY: len(train_ids(msg)),
            PARTITION_KEY: pid,
            TRAIN_LOSS_KEY: 0.0,
            TRAIN_SECONDS_KEY: time.perf_counter() - started,
            TRAIN_TOKENS_KEY: 0,
            ACTOR_PID_KEY: os.getpid(),
        }
    )
    content = {ARRAYS_KEY: msg.content[ARRAYS_KEY], METRICS_KEY: metrics}
    return Message(RecordDict(content), reply_to=msg)


def train(runtime: Callable[[], ClientRuntime], pid: int, msg: Message) -> Message:
    """One local round of client ``pid`` from the global arrays the message carries;
    ``runtime`` gives the actor's cache (asked for after the faults: a client that
    raises does not load models)."""
    from fedrag_ray.methods import local_train

    config: ConfigRecord = msg.content[CONFIG_KEY]
    server_round = int(config[SERVER_ROUND_KEY])
    ids = train_ids(msg)
    faults = _faults()
    inject_faults(pid, server_round, faults)
    rt = runtime()
    fed = rt.cfg.federation
    assert fed is not None
    received = msg.content[ARRAYS_KEY]
    rt.system.load_trainable_state(from_record(received))
    examples = rt.examples(ids)
    # The run's global steps for this client: rounds x local steps (the LR schedule
    # spans the whole run, as the server started it: SCHEDULE_ROUNDS_KEY; `both`
    # alternates on the global step). A tier may set its own local steps (clock.py).
    steps = int(config[LOCAL_STEPS_KEY]) if LOCAL_STEPS_KEY in config else fed.local_steps
    per_round = steps or fed.local_epochs * math.ceil(len(examples) / rt.cfg.train.batch_size)
    counts = rt.system.generator.token_counts
    tokens_before = counts["train"] + counts["score"]
    result = local_train(
        rt.system,
        examples,
        rt.store_for(pid),
        key=(pid, server_round - 1),
        epochs=fed.local_epochs,
        steps=steps,
        proximal_mu=float(config.get(PROXIMAL_MU_KEY, 0.0)),
        start_step=(server_round - 1) * per_round,
        total_steps=int(config.get(SCHEDULE_ROUNDS_KEY, fed.rounds)) * per_round,
    )
    rt.clients_served.add(pid)
    release_free_memory()
    trained = faults.corrupt(pid, rt.system.trainable_state(), from_record(received))
    arrays = to_record(trained)
    metrics = MetricRecord(
        {
            WEIGHT_KEY: result.num_examples,
            PARTITION_KEY: pid,
            TRAIN_LOSS_KEY: result.mean_loss,
            TRAIN_SECONDS_KEY: result.seconds,
            TRAIN_TOKENS_KEY: counts["train"] + counts["score"] - tokens_before,
            STEPS_KEY: result.steps,
            LR_KEY: result.lrs[0] if result.lrs else 0.0,
            RALT_STEPS_KEY: result.ralt_steps,
            LSR_STEPS_KEY: result.lsr_steps,
            BYTES_RECEIVED_KEY: record_nbytes(received),
            BYTES_SENT_KEY: record_nbytes(arrays),
            ACTOR_PID_KEY: os.getpid(),
            ACTOR_CLIENTS_SERVED_KEY: len(rt.clients_served),
            ACTOR_NODE_KEY: node_tag(),
        }
    )
    return Message(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics}), reply_to=msg)


# --------------------------------------------------------------------------- server tasks


def prepare(rt: ClientRuntime, msg: Message) -> Message:
    """Before round 1: the global store on disk (built if missing) and the initial
    trainable arrays, with the full model's size and the index build time."""
    t = time.perf_counter()
    num_passages = rt.prepare_global_store()
    index_seconds = time.perf_counter() - t
    if rt.clients_served:
        raise RuntimeError("prepare must run before any client trains in this actor")
    release_free_memory()  # the index build's buffers
    content = {
        ARRAYS_KEY: to_record(rt.system.trainable_state()),
        METRICS_KEY: MetricRecord(
            {
                FULL_MODEL_BYTES_KEY: rt.system.full_model_bytes(),
                INDEX_SECONDS_KEY: index_seconds,
                NUM_PASSAGES_KEY: num_passages,
            }
        ),
    }
    return Message(RecordDict(content), reply_to=msg)


def evaluate(rt: ClientRuntime, msg: Message) -> Message:
    """Server-side evaluation of the arrays sent, on the held-out questions."""
    from fedrag_ray.evaluate import evaluate_detailed
    from fedrag_ray.stats import join_per_question

    rt.system.load_trainable_state(from_record(msg.content[ARRAYS_KEY]))
    ev = evaluate_detailed(rt.system, rt.eval, rt.global_store_for_server())
    release_free_memory()
    # per-question scores travel too: the server pairs the first and the last
    # evaluation of the same questions for the gain's interval
    record = MetricRecord(join_per_question(ev.metrics, ev.per_question))
    return Message(RecordDict({METRICS_KEY: record}), reply_to=msg)


def retrieve(rt: ClientRuntime, partition: int, msg: Message) -> Message:
    """Search this client's knowledge (``scope: own``) or the global store (``scope:
    global``, central retrieval for comparison) for every question."""
    config = msg.content[CONFIG_KEY]
    questions = [str(q) for q in config[QUESTIONS_KEY]]
    k = int(config[K_KEY])
    _load_sent_arrays(rt, msg)
    store = (
        rt.global_store_for_server() if config[SCOPE_KEY] == "global" else rt.store_for(partition)
    )
    scores, idx = rt.system.retrieve(questions, k, store)
    rows = store.get(idx)
    flat = [p for row in rows for p in row]
    # a list record field may not be empty: one placeholder, ignored (counts are 0)
    hits = ConfigRecord(
        {
            HIT_COUNTS_KEY: [len(row) for row in rows],
            HIT_IDS_KEY: [p.id for p in flat] or [""],
            HIT_DOC_IDS_KEY: [p.doc_id for p in flat] or [""],
            HIT_TEXTS_KEY: [p.text for p in flat] or [""],
            HIT_SCORES_KEY: [
                float(s) for row, srow in zip(rows, scores, strict=True) for s in srow[: len(row)]
            ]
            or [0.0],
        }
    )
    metrics = MetricRecord({PARTITION_KEY: partition})
    return Message(RecordDict({HITS_KEY: hits, METRICS_KEY: metrics}), reply_to=msg)


def answer(rt: ClientRuntime, msg: Message) -> Message:
    """Generate the answer to one question from the merged passages (rank order)."""
    config = msg.content[CONFIG_KEY]
    question, passages = str(config[QUESTION_KEY]), [str(p) for p in config[PASSAGES_KEY]]
    _load_sent_arrays(rt, msg)
    reserve = rt.cfg.rag.max_new_tokens
    kept = rt.system.fit_passages(question, passages, reserve)
    text = rt.system.generator.generate([rt.system.prompt(question, kept, reserve)], reserve)[0]
    content = {ANSWER_KEY: ConfigRecord({ANSWER_TEXT_KEY: text, PASSAGES_USED_KEY: len(kept)})}
    return Message(RecordDict(content), reply_to=msg)
