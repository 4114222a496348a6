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
