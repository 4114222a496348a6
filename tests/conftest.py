import os

import pytest

# Keep torch single-threaded in the test process: the machine has 2 cores shared with the
# Ray actors the integration tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Groups for `pytest -n N --dist loadgroup` (make test): a file's tests run in one worker, so
    its module fixtures are built once; the tests that read the shared `opsd train` run (cli_run)
    run in one worker, so that run is made once. Without -n the marks do nothing.

    tryfirst: xdist reads the marks in a hook of its own, registered after this file, which pluggy
    would otherwise call first. Without it (or under pytest 9, see pyproject.toml) the groups are
    ignored: a file's tests are spread over both workers and each worker makes its own cli_run."""
    for item in items:
        group = "cli_run" if "cli_run" in getattr(item, "fixturenames", ()) else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


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


# The teacher checkpoint's chat template: the tiny model's, after a system turn of its own, so
# that a teacher prompt shows which builder rendered it (the student's template has none).
TEACHER_SYSTEM = "You are the teacher."


@pytest.fixture(scope="session")
def teacher_model(tmp_path_factory) -> str:
    """A second tiny checkpoint for teacher.model: the tiny model's tokenizer (built by the same
    deterministic recipe), other weights (seed 1) and a chat template of its own."""
    from transformers import AutoTokenizer

    from opsd.assets.tiny import CHAT_TEMPLATE, build_tiny_model

    out = build_tiny_model(tmp_path_factory.mktemp("teacher") / "tiny-teacher", seed=1)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = "{{- '<|im_start|>system\\n" + TEACHER_SYSTEM + "<|im_end|>\\n' }}" + CHAT_TEMPLATE
    tok.save_pretrained(out)
    return str(out)
