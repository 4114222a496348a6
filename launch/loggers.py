"""Where per-step metrics go: ``metrics.jsonl`` in the run directory (always), TensorBoard event
files under ``<run_dir>/tensorboard`` (``logging.tensorboard``), and Weights & Biases
(``logging.wandb``, in ``logging.wandb_mode``: offline by default, files under
``<run_dir>/wandb``).

``metrics.jsonl`` keeps every field of a row (lists and nulls included); TensorBoard and W&B get
the numbers only.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Any

from opsd.config import ConfigError, LoggingConfig

WANDB_ID_FILE = "wandb_run_id"


def scalars(row: dict) -> dict[str, float]:
    """The plottable entries of a metrics row: ints and floats (not bools), without ``step``."""
    return {
        k: float(v) for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def require_wandb(cfg: LoggingConfig) -> Any:
    """The wandb module when ``logging.wandb`` is on (None when off); a clear error when it is on
    but not installed. Call it before starting anything expensive."""
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError(
            "logging.wandb=true but the wandb package is not installed: pip install wandb "
            "(or pip install -e '.[wandb]'), or set logging.wandb=false"
        ) from exc
    return wandb


class MetricsLogger:
    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, *, config: dict | None = None):
        """``config``: the resolved run config, recorded by W&B with the run."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.cfg = cfg
        self.tb = None
        self.wandb_run = None
        wandb = require_wandb(cfg)  # first: a missing package fails before any file is opened
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # a dependency: only a broken install gets here
                print(f"opsd: TensorBoard logging off, cannot import it: {exc}", file=sys.stderr)
            else:
                self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if wandb is not None:
            self.wandb_run = self._start_wandb(wandb, config)

    def _start_wandb(self, wandb: Any, config: dict | None) -> Any:
        # One W&B run per run directory: a resumed training run continues the same W&B run.
        id_file = self.run_dir / WANDB_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B ids: letters, digits, - and _
            id_file.write_text(run_id + "\n")
        return wandb.init(
            project=self.cfg.wandb_project, mode=self.cfg.wandb_mode, dir=str(self.run_dir),
            name=self.run_dir.name, id=run_id, resume="allow", config=config,
        )

    def log(self, row: dict) -> None:
        """One row of metrics: a line of metrics.jsonl, and its numbers at ``row["step"]``."""
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        step = row.get("step")
        nums = scalars(row)
        if self.tb is not None:
            for k, v in nums.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(nums, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of ``metrics.jsonl`` by step (a step logged twice keeps its last row). A torn last
    line, as a run being written may leave, is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is it a run directory?)")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    by_step: dict[int, dict] = {}
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"{path}, line {i + 1}: not JSON") from None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]
