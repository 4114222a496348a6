import os

import pytest

# Keep torch single-threaded in the test process: the machine has 2 cores shared with the
# Ray actors the integration tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The tiny model's directory, built once (its first build prints progress, which tests that
    read a command's output must not see)."""
    from opsd.assets.models import resolve_model_path

    return resolve_model_path("tiny")


@pytest.fixture
def nothing_fetched(monkeypatch, tmp_path, tiny_model):
    """A machine where no named model or set has been fetched (the tiny model is built locally,
    so it is there), and whose Hugging Face cache is empty: answers do not depend on what earlier
    runs left in artifacts/. Returns the (empty) artifacts directory."""
    monkeypatch.setenv("OPSD_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("OPSD_TINY_DIR", tiny_model)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "artifacts"
