"""The message protocol between fedrag_ray's ServerApp and ClientApp, in one place.

Every name a server message or a client reply carries is defined here, so the two sides
(``server_app.py``, ``client_app.py``, and the DP / SecAgg+ / validation code between
them) cannot drift apart on a string literal.

Message types are Flower's: ``MessageType.TRAIN`` is one client's local round;
``MessageType.EVALUATE`` is model work the server hands to a client actor (the driver
never loads a model), named by :data:`TASK_KEY`: :data:`TASK_PREPARE` (build the global
index if missing, reply with the initial trainable arrays) or :data:`TASK_EVALUATE`
(score the arrays sent on the held-out questions).

Federated retrieval at inference (``federated_retrieval.py``) speaks the same way: a
:data:`TASK_RETRIEVE` message carries ``{CONFIG_KEY: {TASK_KEY, QUESTIONS_KEY, K_KEY,
SCOPE_KEY}, [ARRAYS_KEY]}`` and its reply ``{HITS_KEY: {HIT_COUNTS_KEY, HIT_IDS_KEY,
HIT_DOC_IDS_KEY, HIT_TEXTS_KEY, HIT_SCORES_KEY}, METRICS_KEY: {PARTITION_KEY}}``; a
:data:`TASK_ANSWER` message ``{CONFIG_KEY: {TASK_KEY, QUESTION_KEY, PASSAGES_KEY}}`` and
its reply ``{ANSWER_KEY: {ANSWER_TEXT_KEY, PASSAGES_USED_KEY}}``.

A train message:  ``{ARRAYS_KEY: global arrays, CONFIG_KEY: {SERVER_ROUND_KEY,
EXAMPLE_IDS_KEY, SCHEDULE_ROUNDS_KEY, [PROXIMAL_MU_KEY], [LOCAL_STEPS_KEY]}}``; its reply:
``{ARRAYS_KEY: trained arrays, METRICS_KEY: {PARTITION_KEY, WEIGHT_KEY, TRAIN_LOSS_KEY,
TRAIN_SECONDS_KEY, TRAIN_TOKENS_KEY, ...}}``.
"""

from __future__ import annotations

from flwr.common.constant import PARTITION_ID_KEY

# Records of a message's RecordDict.
ARRAYS_KEY = "arrays"  # ArrayRecord: the trainable arrays (global down, trained up)
CONFIG_KEY = "config"  # ConfigRecord of a server message
METRICS_KEY = "metrics"  # MetricRecord of a reply
# In an evaluation row: each question's scores by metric (fedrag_ray.stats keeps the
# flat-record form, ``per_question/<metric>`` lists, for the MetricRecord itself).
PER_QUESTION_KEY = "per_question"

# Config keys of server messages.
SERVER_ROUND_KEY = "server-round"  # Flower's strategies inject it too
EXAMPLE_IDS_KEY = "example-ids"  # the client's question indices into the train set
PROXIMAL_MU_KEY = "proximal-mu"  # set by Flower's FedProx
# the rounds the run's LR schedule spans: those it was started with, also after a resume
# with more rounds (a resumed run is the run it would have been, then more rounds at the
# schedule's end)
SCHEDULE_ROUNDS_KEY = "schedule-rounds"
# the client's local steps when its tier sets them (a slow client does fewer; clock.py)
LOCAL_STEPS_KEY = "local-steps"
TASK_KEY = "task"  # of an EVALUATE message: which server task
TASK_PREPARE = "prepare"
TASK_EVALUATE = "evaluate"
# federated retrieval at inference (federated_retrieval.py: its own hit/answer records)
TASK_RETRIEVE = "retrieve"
TASK_ANSWER = "answer"
SERVER_TASKS = (TASK_PREPARE, TASK_EVALUATE, TASK_RETRIEVE, TASK_ANSWER)

# Metric keys of a train reply. The partition id is Flower's node_config key, so a reply
# names its client the way the simulation engine does.
PARTITION_KEY = PARTITION_ID_KEY  # "partition-id"
WEIGHT_KEY = "num-examples"  # what FedAvg weights by
TRAIN_LOSS_KEY = "train-loss"
TRAIN_SECONDS_KEY = "train-seconds"
# generator tokens the task processed (train + score): the simulated clock's compute
TRAIN_TOKENS_KEY = "train-tokens"
UNIFORM_WEIGHT_KEY = "dp-uniform-weight"  # set to 1 on every accepted reply under DP

# What else a train reply reports about the client and the actor that served it.
STEPS_KEY = "steps"
LR_KEY = "lr"  # the generator's LR at the client's first local step
RALT_STEPS_KEY = "ralt-steps"
LSR_STEPS_KEY = "lsr-steps"
BYTES_RECEIVED_KEY = "bytes-received"
BYTES_SENT_KEY = "bytes-sent"
ACTOR_PID_KEY = "actor-pid"
ACTOR_CLIENTS_SERVED_KEY = "actor-clients-served"
ACTOR_NODE_KEY = "actor-node"  # the Ray node id's first 8 hex digits, as an int

# Metric keys of a prepare reply.
FULL_MODEL_BYTES_KEY = "full-model-bytes"
INDEX_SECONDS_KEY = "index-seconds"
NUM_PASSAGES_KEY = "num-passages"

# Config keys of the FitIns that SecAgg+ (a legacy workflow) carries to the client mod.
ARRAY_NAMES_KEY = "fedrag-array-names"  # the array names, "\n"-joined, in order
UNIFORM_KEY = "fedrag-uniform-weight"  # weight every client 1 (DP)

# Federated retrieval at inference: a retrieve message's config and its reply's hits.
QUESTIONS_KEY = "questions"
K_KEY = "k"
SCOPE_KEY = "scope"  # "own" (the client's knowledge) or "global" (central, to compare)
HITS_KEY = "hits"  # ConfigRecord of a retrieve reply: flat lists, HIT_COUNTS_KEY per question
HIT_COUNTS_KEY = "counts"
HIT_IDS_KEY = "ids"
HIT_DOC_IDS_KEY = "doc-ids"
HIT_TEXTS_KEY = "texts"
HIT_SCORES_KEY = "scores"
# an answer message's config and its reply
QUESTION_KEY = "question"
PASSAGES_KEY = "passages"
ANSWER_KEY = "answer"  # ConfigRecord of an answer reply
ANSWER_TEXT_KEY = "text"
PASSAGES_USED_KEY = "passages-used"
