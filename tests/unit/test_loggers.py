"""MetricsLogger: metrics.jsonl rows as given, TensorBoard scalars, W&B offline runs."""

import json
import sys

import pytest

from opsd.launch.loggers import MetricsLogger, require_wandb, scalars
from opsd.config import ConfigError, LoggingConfig

ROWS = [
    {"step": 1, "loss": 0.75, "kl_sampled": 0.5, "reward_mean": 0.25, "tokens_generated_total": 120,
     "sample_ids": ["a:0#0", "a:1#0"], "truncated_frac": 0.0},
    {"step": 2, "loss": 0.5, "kl_sampled": 0.25, "reward_mean": None, "tokens_generated_total": 250,
     "sample_ids": ["a:2#0", "a:3#0"], "truncated_frac": 0.5},
    {"step": 3, "loss": 0.25, "kl_sampled": 0.125, "reward_mean": 0.5, "tokens_generated_total": 400,
     "sample_ids": [], "truncated_frac": 0.0, "eval/avg@1": 0.375, "eval/problems": 16},
]


def test_scalars_numbers_only():
    row = {"step": 3, "a": 1, "b": 2.5, "c": None, "d": [1], "e": "x", "f": True}
    assert scalars(row) == {"a": 1.0, "b": 2.5}


def test_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=True, wandb=False)) as log:
        for row in ROWS:
            log.log(row)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln) for ln in lines] == ROWS  # one JSON object per line, every field kept

    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "kl_sampled", "reward_mean", "tokens_generated_total", "truncated_frac",
            "eval/avg@1", "eval/problems"} <= tags
    assert not tags & {"step", "sample_ids"}
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([0.75, 0.5, 0.25])
    assert [(e.step, e.value) for e in acc.Scalars("reward_mean")] == [(1, 0.25), (3, 0.5)]  # None skipped
    assert [(e.step, e.value) for e in acc.Scalars("eval/avg@1")] == [(3, 0.375)]


def test_jsonl_appends_and_tensorboard_off(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    with MetricsLogger(tmp_path, LoggingConfig(tensorboard=False)) as log:
        log.log(ROWS[0])
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert not (tmp_path / "tensorboard").exists()


def test_wandb_enabled_but_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    cfg = LoggingConfig(wandb=True)
    with pytest.raises(ConfigError, match="pip install wandb"):
        require_wandb(cfg)
    with pytest.raises(ConfigError, match="logging.wandb=false"):
        MetricsLogger(tmp_path, cfg)
    assert not (tmp_path / "tensorboard").exists()  # failed before opening anything
    assert require_wandb(LoggingConfig(wandb=False)) is None


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = LoggingConfig(tensorboard=False, wandb=True, wandb_mode="offline", wandb_project="opsd-test")
    log = MetricsLogger(tmp_path, cfg, config={"loss": {"beta": 0.5}})
    try:
        for row in ROWS:
            log.log(row)
    finally:
        log.close()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1, list((tmp_path / "wandb").iterdir())
    assert list(runs[0].glob("*.wandb"))  # the offline run's data file, for `wandb sync`
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == len(ROWS)
