"""Federated retrieval at inference: a question goes to every client's private knowledge,
each client returns its top-k (passage ids, scores, texts), the server merges them.

It runs on the training machinery: a :class:`~.simulation.FederatedSession` prepares the
federation (global store, private shards, shard actors, store-root check) as for
training, then, instead of training rounds, runs one of the tasks built here
(:func:`ask_inference`, :func:`eval_inference`): one ``evaluate`` message with ``task:
retrieve`` to every client node. A client searches what it would train on (its private
shard; with ``knowledge: both`` also the public store) with its query encoder and
replies with lists only (``client_tasks.retrieve``); the server merges them by score or
reciprocal-rank fusion (``fusion``). ``ask --federated`` then has one client actor
generate the answer from the merged passages; ``eval --federated`` compares the merged
lists with central retrieval over the global store (the same corpus) on the held-out
questions. A task returns its results; the session returns them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedrag_ray.data import Passage
from fedrag_ray.federated.params import to_record
from fedrag_ray.federated.protocol import (
    ANSWER_KEY,
    ANSWER_TEXT_KEY,
    ARRAYS_KEY,
    CONFIG_KEY,
    HIT_COUNTS_KEY,
    HIT_DOC_IDS_KEY,
    HIT_IDS_KEY,
    HIT_SCORES_KEY,
    HIT_TEXTS_KEY,
    HITS_KEY,
    K_KEY,
    METRICS_KEY,
    PARTITION_KEY,
    PASSAGES_KEY,
    PASSAGES_USED_KEY,
    QUESTION_KEY,
    QUESTIONS_KEY,
    SCOPE_KEY,
    TASK_ANSWER,
    TASK_KEY,
    TASK_RETRIEVE,
)
from fedrag_ray.fusion import Hit, merge

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from fedrag_ray.config import ExperimentConfig
    from fedrag_ray.federated.server_app import FederatedServer, FederationTask


# --------------------------------------------------------------------------- server side


def _parse(reply: Message, source: int) -> list[list[Hit]]:
    hits = reply.content[HITS_KEY]
    counts = list(hits[HIT_COUNTS_KEY])
    out, pos = [], 0
    for n in counts:
        out.append(
            [
                Hit(
                    Passage(
                        id=hits[HIT_IDS_KEY][i],
                        text=hits[HIT_TEXTS_KEY][i],
                        doc_id=hits[HIT_DOC_IDS_KEY][i],
                    ),
                    float(hits[HIT_SCORES_KEY][i]),
                    source,
                )
                for i in range(pos, pos + n)
            ]
        )
        pos += n
    return out


def fan_out(
    grid: Grid,
    nodes: dict[int, int],
    questions: list[str],
    k: int,
    timeout: float,
    scope: str = "own",
    arrays: dict[str, np.ndarray] | None = None,
) -> tuple[dict[int, list[list[Hit]]], list[str]]:
    """One retrieve message per client (partition → node); its hits per question, and
    the reasons of the clients that failed."""
    messages = []
    for _pid, node in sorted(nodes.items()):
        content = RecordDict(
            {
                CONFIG_KEY: ConfigRecord(
                    {TASK_KEY: TASK_RETRIEVE, QUESTIONS_KEY: questions, K_KEY: k, SCOPE_KEY: scope}
                )
            }
        )
        if arrays is not None:
            content[ARRAYS_KEY] = to_record(arrays)
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.EVALUATE))
    by_client: dict[int, list[list[Hit]]] = {}
    failed: list[str] = []
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    for reply in replies:
        if reply.has_error():
            failed.append(reply.error.reason)
            continue
        pid = int(reply.content[METRICS_KEY][PARTITION_KEY])
        by_client[pid] = _parse(reply, pid)
    failed += ["timeout"] * (len(messages) - len(replies))
    return by_client, failed


def merged_hits(
    cfg: ExperimentConfig, by_client: dict[int, list[list[Hit]]], n_questions: int, k: int
) -> list[list[Hit]]:
    fed = cfg.federation
    assert fed is not None
    how, rrf_k = fed.retrieval.merge, fed.retrieval.rrf_k
    return [
        merge([by_client[c][q] for c in sorted(by_client)], k, how, rrf_k)
        for q in range(n_questions)
    ]


def _hits_json(hits: list[Hit]) -> list[dict[str, Any]]:
    return [
        {"id": h.passage.id, "doc_id": h.passage.doc_id, "score": h.score, "client": h.source}
        for h in hits
    ]


def _overlap(a: list[Hit], b: list[Hit]) -> float:
    ids = {h.passage.id for h in b}
    return len({h.passage.id for h in a} & ids) / max(1, len(ids))


def _gold_recall(rows: list[list[Hit]], gold: list[list[str]], k: int) -> float:
    from fedrag_ray.evaluate import recall_at_k

    return recall_at_k([[h.passage.doc_id for h in row] for row in rows], gold, k)


def ask_inference(
    questions: list[str], k: int, arrays: dict[str, np.ndarray] | None, generate: bool = True
) -> FederationTask:
    """The task of ``ask --federated``: merged passages (+ an answer), as
    ``{"federated_retrieval": ...}``."""

    def run(grid: Grid, server: FederatedServer, initial: dict[str, np.ndarray]) -> dict[str, Any]:
        timeout = server.fed.round_timeout_s
        t = time.perf_counter()
        by_client, failed = fan_out(grid, server.part_to_node, questions, k, timeout, arrays=arrays)
        if not by_client:
            raise RuntimeError(f"federated retrieval: every client failed: {failed[:3]}")
        merged = merged_hits(server.cfg, by_client, len(questions), k)
        out: dict[str, Any] = {
            "clients": sorted(by_client),
            "failed": failed,
            "retrieve_seconds": time.perf_counter() - t,
            "per_client": {c: [_hits_json(h) for h in rows] for c, rows in by_client.items()},
            "merged": [_hits_json(h) for h in merged],
            "merged_texts": [[h.passage.text for h in row] for row in merged],
        }
        if generate:
            out["answers"] = [
                _answer(grid, server, q, [h.passage.text for h in row], arrays)
                for q, row in zip(questions, merged, strict=True)
            ]
        return {"federated_retrieval": out}

    return run


def _answer(
    grid: Grid,
    server: FederatedServer,
    question: str,
    passages: list[str],
    arrays: dict[str, np.ndarray] | None,
) -> dict[str, Any]:
    """One client actor (the next one if it fails) answers from the merged passages."""
    config = {TASK_KEY: TASK_ANSWER, QUESTION_KEY: question, PASSAGES_KEY: passages or [""]}
    content = RecordDict({CONFIG_KEY: ConfigRecord(config)})
    if arrays is not None:
        content[ARRAYS_KEY] = to_record(arrays)
    reply = server.send_to_any_node(grid, content, "answer generation")
    return {
        "answer": str(reply.content[ANSWER_KEY][ANSWER_TEXT_KEY]),
        "passages_used": int(reply.content[ANSWER_KEY][PASSAGES_USED_KEY]),
    }


def eval_inference(
    questions: list[str], gold: list[list[str]], k_values: list[int]
) -> FederationTask:
    """The task of ``eval --federated``: merged federated retrieval vs central retrieval
    over the global store, on the same questions and corpus (``federated_eval``,
    ``federated_merged``, ``central``)."""
    k = max(k_values)

    def run(grid: Grid, server: FederatedServer, initial: dict[str, np.ndarray]) -> dict[str, Any]:
        timeout = server.fed.round_timeout_s
        t = time.perf_counter()
        by_client, failed = fan_out(grid, server.part_to_node, questions, k, timeout)
        fed_seconds = time.perf_counter() - t
        merged = merged_hits(server.cfg, by_client, len(questions), k)
        first = dict([next(iter(sorted(server.part_to_node.items())))])
        t = time.perf_counter()
        central_by, central_failed = fan_out(grid, first, questions, k, timeout, scope="global")
        central_seconds = time.perf_counter() - t
        if not central_by:
            raise RuntimeError(f"central retrieval failed: {central_failed[:3]}")
        central = next(iter(central_by.values()))
        metrics: dict[str, Any] = {
            "n": len(questions),
            "clients": len(by_client),
            "failed": failed,
            "federated_seconds": fed_seconds,
            "central_seconds": central_seconds,
        }
        for kk in k_values:
            fed_k = [row[:kk] for row in merged]
            cen_k = [row[:kk] for row in central]
            metrics[f"federated_recall@{kk}"] = _gold_recall(fed_k, gold, kk)
            metrics[f"central_recall@{kk}"] = _gold_recall(cen_k, gold, kk)
            metrics[f"overlap_with_central@{kk}"] = float(
                np.mean([_overlap(a, b) for a, b in zip(fed_k, cen_k, strict=True)])
            )
        return {
            "federated_eval": metrics,
            "federated_merged": [_hits_json(h) for h in merged],
            "central": [_hits_json(h) for h in central],
        }

    return run


def run_federated_retrieval(
    cfg: ExperimentConfig,
    task: FederationTask,
    output: str | Path | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    on_phase: Any = None,
) -> dict[str, Any]:
    """Prepare the federation as a training run would, then run ``task`` on it."""
    from fedrag_ray.federated.simulation import FederatedSession

    if cfg.federation is None:
        raise ValueError("federated retrieval needs a federation: section")
    session = FederatedSession(cfg, output, address=address, num_cpus=num_cpus, on_phase=on_phase)
    return session.retrieve(task)
