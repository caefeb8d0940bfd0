"""The side-by-side benchmark of fedrag_ray and the peer, fed-rag 0.0.27 (entry point:
``benchmarks/peer_fedrag.py``; what it measures is in that file's docstring).

- ``run_peer.py``: the peer's harness, a script run by the peer's own venv (it loads
  ``benchmarks/harness`` by path); ``make_tiny_generator.py``, ``summarize.py``, the shell
  scripts: the peer alone (see ``README.md``).
- ``job``: the job both systems run and our config for it; ``job_data``: the same
  questions, passages and client split for both; ``prepare``: the peer's venv, the shared
  generator and the peer's LoRA adapter; ``ours_worker``: one fedrag_ray run, measured,
  inside its own subprocess; ``runs``: one run of either system, as a subprocess;
  ``compare``: medians, ratios, verdicts and the table; ``figure``: the PNG; ``notes``:
  what the JSON says about method; ``cli``: the command line and the result file.
"""
