"""What the result file says about method: how each figure was measured on each side
and where the two systems differ by design."""

NOTES = [
    "Same job on both sides: methods LSR and RALT, K = 2 and 4 (all sampled each round), "
    "3 rounds, 5 local steps, batch 4 questions, lr 1e-4 (ours: lr and retriever_lr), top_k 2 "
    "(ours: rag.top_k, train.lsr.k, train.ralt.k), 64 PubMedQA PQA-L questions (the first 64 "
    "in file order, target final_decision), 500 passages (the peer's load_rows: CONTEXTS of "
    "the items in file order, deduplicated), the generator named in job.generator (one "
    "directory for both sides), MiniLM retriever with a frozen passage encoder and a "
    "trainable query encoder.",
    "Same client split: the training file is ordered per K so that fedrag_ray's iid "
    "partition_examples (seed 0) gives every client exactly the question set of the peer's "
    "iid_partitions (seed 0); checked before running (data.splits).",
    "Different by design: fedrag_ray trains LoRA adapters and ships only them ('only adapters "
    "cross the wire'): RALT = generator LoRA r=8, alpha 16 on q/k/v/o_proj; LSR = query-encoder "
    "LoRA r=8 on query/value (retriever.train: lora). fed-rag ships the full fp32 state dict "
    "of what it trains (LSR: the 22.7 M-parameter query encoder; RALT: the same generator LoRA "
    "as ours with --peer-ralt lora, see job.peer_ralt, or the whole generator). LSR with "
    "retriever.train: full is run once per K (ours_full_query_encoder) to show bytes with the "
    "full query encoder.",
    "Different by design: fedrag_ray evaluates on the server (16 held-out questions, the next "
    "16 in file order, retrieval + label scoring, no generation) every 3 rounds; fed-rag runs a "
    "federated placeholder evaluation every round that re-broadcasts the full weights (1/3 of "
    "its bytes). Headline per-round time: peer round_s (round start -> end of its evaluation) vs "
    "ours round_seconds (train + aggregate; eval not included); round_fit_s ratios compare the "
    "train + aggregate parts only.",
    "Processes and CPU: both on the same 2 cores. fed-rag: K+1 processes (server + K clients), "
    "1 torch thread each. fedrag_ray: one driver process (server, index build, evaluation; torch "
    "default threads = 2) + Ray (GCS, raylet, 2 client actors with num_cpus 1 -> 1 torch thread "
    "each; at K=4 each actor serves 2 virtual clients per round in sequence).",
    "Memory: both sampled the same way (sum over the process trees, RSS every 0.2 s, PSS every "
    "1 s). Peer: server + client trees (launcher and store-build process excluded). Ours: the "
    "worker process tree (driver + every Ray process); headline 'rss_gib' = max(sampled peak, "
    "the server's own per-round peak_rss_bytes, which is a snapshot at the end of each round).",
    "Bytes: peer = .npy bytes of the parameters in FitIns + FitRes + EvaluateIns; ours = "
    "bytes_sent + bytes_received of the history rows (len of each Array's .npy bytes, down and "
    "up; no parameters in evaluation). gRPC/protobuf framing excluded on both sides.",
    "Setup: peer = launcher start -> round 1 start (includes its knowledge-store build with one "
    "thread in a separate process); ours = worker start -> round 1 start "
    "(timings.first_round_started_at; includes imports, Ray start, actor start, discovery, "
    "model loads and the index build on the actor that runs `prepare` with one thread, the "
    "round-0 server evaluation on that actor). setup_excl_index_s removes the index/store "
    "build on both sides.",
    "Round 1 of fedrag_ray includes the other client actors building their RAG system "
    "(lazily, on the first train message); the peer's clients build theirs before round 1 "
    "(in setup). Medians over 3 rounds.",
    "fedrag_ray's driver loads no model (it imports neither torch nor transformers): "
    "preparation and server-side evaluation run on a client actor "
    "(driver_imported_torch is recorded per run).",
    "Weight change: peer = weight_change_l2 of its server's final aggregated weights vs initial "
    "(query encoder for LSR, generator for RALT); ours = L2 of final - initial trainable arrays "
    "with prefix retriever. (LSR) or generator. (RALT), i.e. of the LoRA adapters (or of the "
    "full query encoder); the initial arrays are rebuilt from the seed after the run. A non-zero "
    "value shows the retriever (LSR) actually trains: the peer's LSR leaves it unchanged "
    "(its defect 1).",
    "Loss functions differ (fedrag_ray: answer-token-only RALT loss, LSR with temperature tau "
    "0.1 over log-likelihoods, prompts truncated to 256 tokens; fed-rag: whole-sequence labels, "
    "untruncated, LSR over raw probabilities): same work shape, not identical arithmetic.",
    "CPU: 'CPU s / round' is comparable (peer: clients' CPU inside fit + server CPU over the "
    "round; ours: whole process tree between round callbacks, median of the 3 rounds). "
    "job_cpu_s is not: the peer's excludes its store-build process and launcher, ours includes "
    "imports, Ray start and the index build of the worker.",
    "Where fedrag_ray's memory goes (peak RSS per process, typical K=4 LSR run): driver "
    "~1.15 GiB (server: generator + LoRA, passage encoder, query encoder, index, evaluation), "
    "2 client actors ~1.0 GiB each, Ray's own processes ~0.7 GiB (GCS, raylet, dashboard head "
    "(minimal, started even with include_dashboard=False), dashboard agent, runtime-env agent, "
    "autoscaler monitor, log monitor, 2 prestarted idle workers ~80 MB each). It does not grow "
    "with K (2 actors serve all clients): 3.2-3.7 GiB from K=2 to K=64.",
    "The machine is shared with other jobs: see the load averages; ratios are within one run, "
    "peer and ours alternating cell by cell, median of the repeats.",
]
