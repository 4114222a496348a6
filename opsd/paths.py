"""Where things are: the repository (configs/, data/) and the artifacts a run makes once and keeps
(named models and datasets, wheels) under ``artifacts/``. Imports nothing of opsd."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def artifacts_dir() -> Path:
    """Where named models and datasets are made: $OPSD_ARTIFACTS, else ``artifacts/`` in the repository."""
    env = os.environ.get("OPSD_ARTIFACTS")
    return Path(env) if env else REPO_ROOT / "artifacts"
