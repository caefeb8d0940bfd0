"""The Flower ClientApp: routes each message to its handler (``client_tasks``).

A Ray actor process serves many virtual clients from one cache of models, data and
stores (``client_runtime.ClientRuntime``); a virtual client is only what its train
message carries and its private shard. Replies carry only parameter arrays and scalar
metrics; every record key is ``protocol``'s.

The actors are also where the server's model work runs, so the driver never loads a
model (it would be a third copy of torch, transformers and the weights next to the
actors' — and on a cluster, a generator on the head node): ``evaluate`` messages name
their task (prepare, evaluate, retrieve, answer; ``protocol.TASK_KEY``).

Chaos testing: ``FEDRAG_RAY_FAULTS="raise:3,kill:5@2,nan:1,scale:2×1000"`` makes
partition 3 raise in every round, the actor serving partition 5 exit hard in round 2,
partition 1 reply with NaN and partition 2 scale its update by 1000 (``faults`` lists
them all; used by the tests, and handy to check a deployment's failure tolerance).
Differential privacy and secure aggregation are Flower mods on the train handler
(``privacy.train_mods``).
"""

from __future__ import annotations

import json
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedrag_ray.config import config_from_dict
from fedrag_ray.federated import client_tasks
from fedrag_ray.federated.client_runtime import get_runtime, global_store_path, store_dir
from fedrag_ray.federated.privacy import train_mods
from fedrag_ray.federated.protocol import (
    CONFIG_KEY,
    PARTITION_KEY,
    TASK_ANSWER,
    TASK_EVALUATE,
    TASK_KEY,
    TASK_PREPARE,
    TASK_RETRIEVE,
)

__all__ = ["global_store_path", "make_client_app", "store_dir"]


def make_client_app(cfg_json: str, stores_root: str, run_id: str = "") -> ClientApp:
    """A ClientApp whose closures hold only three strings (cheap to ship to actors);
    ``run_id`` names the run's shard actors (``serve: actors``)."""
    fed = config_from_dict(json.loads(cfg_json)).federation
    noop = fed is not None and fed.client_step == "noop"
    app = ClientApp()

    @app.evaluate()
    def server_task(msg: Message, context: Context) -> Message:
        """Model work on behalf of the server (see the module docstring)."""
        task = str(msg.content[CONFIG_KEY][TASK_KEY])
        rt = get_runtime(cfg_json, stores_root, run_id)
        if task == TASK_PREPARE:
            return client_tasks.prepare(rt, msg)
        if task == TASK_EVALUATE:
            return client_tasks.evaluate(rt, msg)
        if task == TASK_RETRIEVE:
            return client_tasks.retrieve(rt, int(context.node_config[PARTITION_KEY]), msg)
        if task == TASK_ANSWER:
            return client_tasks.answer(rt, msg)
        raise ValueError(f"unknown server task {task!r}")

    @app.train(mods=train_mods(cfg_json))
    def train(msg: Message, context: Context) -> Message:
        started = time.perf_counter()
        pid = int(context.node_config[PARTITION_KEY])
        if noop:
            return client_tasks.train_noop(pid, msg, started)
        return client_tasks.train(lambda: get_runtime(cfg_json, stores_root, run_id), pid, msg)

    return app
