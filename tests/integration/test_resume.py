"""Test 5: stop after step k, resume, and steps k+1.. repeat an uninterrupted run exactly."""

from __future__ import annotations

import numpy as np
import pytest

from launch.driver import train
from opsd.config import REPO_ROOT

from .conftest import local_overrides, read_metrics

pytestmark = pytest.mark.integration

CONFIG = str(REPO_ROOT / "configs" / "tiny.yaml")
COMMON = ("train.checkpoint_every=2", "eval.every=0")


def test_resume_repeats_the_uninterrupted_run(tmp_path, ray_session):
    full = train(CONFIG, local_overrides(tmp_path / "full", "train.steps=4", *COMMON))
    part = train(CONFIG, local_overrides(tmp_path / "part", "train.steps=2", *COMMON))
    # The resumed run reads its saved config; only train.steps changes.
    resumed = train(None, [f"train.resume={part}", "train.steps=4"])
    assert resumed == part

    a, b = read_metrics(full), read_metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert x["sample_ids"] == y["sample_ids"], f"step {x['step']}: different prompts"
        assert x["policy_version"] == y["policy_version"]
        assert x["tokens_generated"] == y["tokens_generated"], f"step {x['step']}: different samples"
    # Same weights, optimizer state and samples: the losses agree to float32 rounding.
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-5)
    assert b[-1]["tokens_generated_total"] == a[-1]["tokens_generated_total"]
