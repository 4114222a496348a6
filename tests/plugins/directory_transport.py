"""A weight transport outside opsd: every bucket is a safetensors file in a directory on a file
system the sender and the receivers share (here: /tmp of this machine). Store-and-forward, like
object_store: the update's handles are the files' paths.

Used as ``sync.transport=tests.plugins.directory_transport:DIRECTORY``; this file and nothing
else is what adding it took.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from opsd.workers.transports import Transport
from opsd.workers.transports.base import (
    BucketLayout, NamedTensors, WeightReceiver, WeightSender, WeightSyncError, WeightUpdate,
)


class DirectorySender(WeightSender):
    def __init__(self, device="cpu", timeout_s: float = 600.0):
        super().__init__(device, timeout_s)
        self.root = Path(tempfile.mkdtemp(prefix="opsd-directory-transport-"))

    def send(self, version: int, buckets: Iterable[NamedTensors], *, layout: Sequence[BucketLayout] = (),
             groups: Sequence[str] = ()) -> WeightUpdate:
        from safetensors.torch import save_file

        # The last push stays readable (a restarted receiver is caught up from it); older ones go.
        for old in self.root.glob("v*"):
            if old.name != f"v{version}":
                shutil.rmtree(old)
        folder = self.root / f"v{version}"
        folder.mkdir(exist_ok=True)
        paths, n, nbytes = [], 0, 0
        for i, bucket in enumerate(buckets):
            path = folder / f"bucket-{i:04d}.safetensors"
            save_file({name: t.detach().contiguous().cpu() for name, t in bucket}, str(path))
            paths.append(str(path))
            n += len(bucket)
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        return WeightUpdate(version, "tests.plugins.directory_transport:DIRECTORY", tuple(paths), n, nbytes)


class DirectoryReceiver(WeightReceiver):
    @contextmanager
    def receiving(self, update: WeightUpdate) -> Iterator[NamedTensors]:
        from safetensors.torch import load_file

        try:
            named = [pair for path in update.handles for pair in load_file(path).items()]
        except OSError as exc:
            raise WeightSyncError(f"weight version {update.version}: {exc}") from exc
        if len(named) != update.num_tensors:
            raise WeightSyncError(f"weight version {update.version}: {len(named)} tensors, expected {update.num_tensors}")
        yield named


DIRECTORY = Transport(
    "tests.plugins.directory_transport:DIRECTORY", collective=False,
    sender="tests.plugins.directory_transport:DirectorySender",
    receiver="tests.plugins.directory_transport:DirectoryReceiver",
)
