"""opsd: On-Policy Self-Distillation of LLMs on Ray, vLLM and DeepSpeed (docs/DESIGN.md).

``opsd`` is the only top-level import name. The repository keeps four code folders, and they
import as one namespace:

    opsd/        opsd             the algorithm (config, batch, losses, prompts, ...) and
                                  opsd.assets (named models and datasets, generators)
    workers/     opsd.workers     the Ray actors
    launch/      opsd.launch      the CLI, the driver and the Ray wiring
    benchmarks/  opsd.benchmarks  `opsd bench ...`

An installed wheel holds the last three inside ``opsd/`` (pyproject.toml maps them there). Run
from a source tree (an editable install, a checkout on PYTHONPATH, or the copy of the repository
that ``ray job submit`` uploads as its working directory) they are the folders beside this one,
and :class:`_SourceFolders` below tells the import system so.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

SUBPACKAGES = ("workers", "launch", "benchmarks")


class _SourceFolders(importlib.abc.MetaPathFinder):
    """Finds ``opsd.workers``, ``opsd.launch`` and ``opsd.benchmarks`` in the top-level folders
    of the source tree this package was imported from, and nothing else."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname: str, path=None, target=None):
        parent, _, name = fullname.rpartition(".")
        if parent != __name__ or name not in SUBPACKAGES:
            return None
        folder = self.root / name
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def _map_source_folders() -> None:
    here = Path(__file__).resolve().parent
    if (here / SUBPACKAGES[0]).is_dir():
        return  # installed from a wheel: the subpackages are inside this folder
    root = here.parent
    if all((root / name / "__init__.py").is_file() for name in SUBPACKAGES):
        # First, so that a source tree's own folders win over an editable install's mapping
        # of another checkout (Ray's working_dir copy of this repository, for one).
        sys.meta_path.insert(0, _SourceFolders(root))


_map_source_folders()
