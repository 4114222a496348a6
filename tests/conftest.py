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
