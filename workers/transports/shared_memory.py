"""The memory behind the ``in_place`` transport (in_place.py): receivers on learner rank 0's host
copy its weights straight out of its memory, one copy per push instead of two.

On its first in-place push rank 0 moves the storages behind its weights into shared memory, in place
(torch's ``share_memory_``: every tensor that views a storage keeps viewing it, only the pages
behind it move). Under ZeRO 1 and 2 that is DeepSpeed's one flat buffer per parameter group;
without ZeRO it is each parameter's own storage. From then on a push only says where each tensor
lies (segment, byte offset, shape, dtype), and a receiver maps those segments read-only through
``/proc/<pid>/fd/<fd>`` and copies each tensor into its own weights: one copy of the weights per
push instead of two (into the store, then out of it).

These are the learner's live weights, so a small header segment says which pushed version the
segments hold, and a lock on it (``flock``) says who may touch them:

* a receiver holds it shared while it copies, after checking that the header holds the version
  of its update (when it does not, the learner has changed its weights since: the update is
  refused with a WeightSyncError, it is never read half-changed);
* learner rank 0 holds it exclusively while it changes its weights (an optimizer step, loading a
  checkpoint) and leaves the header at "no version" until its next push publishes one.

The driver never asks for both at once (a push is loaded everywhere before the next step starts,
and a restarted receiver is caught up while the learner is idle), so in a healthy run the lock
never waits: it turns a mistake into an error instead of a torn copy. A receiver that dies while
it holds the lock releases it with its process.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import struct
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

SHM_DIR = "/dev/shm"
NO_VERSION = -1
# At most this many segments are shared (one per parameter without ZeRO); a model split into
# more storages than that is pushed through the object store instead.
MAX_SEGMENTS = 1024
_HEADER = struct.Struct("<16sq")  # token (which sender), version held (NO_VERSION: changed since)


class SharedWeightsError(RuntimeError):
    """Raised by the receiving side; the in_place receiver re-raises it as a WeightSyncError."""


@dataclass(frozen=True)
class Segment:
    """One shared storage of the sender: its file descriptor there, and its size."""

    fd: int
    nbytes: int


@dataclass(frozen=True)
class SharedTensor:
    name: str
    segment: int
    offset: int  # bytes into the segment
    shape: tuple[int, ...]
    dtype: str  # a torch dtype name

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class SharedHandle:
    """What a receiver needs to map the sender's segments; the same for every push of a sender."""

    pid: int
    token: bytes
    header: Segment
    segments: tuple[Segment, ...]
    timeout_s: float


def _lock(fd: int, how: int, timeout_s: float, what: str) -> None:
    """flock ``fd`` (shared or exclusive) within ``timeout_s``, else raise naming ``what``."""
    deadline = time.monotonic() + timeout_s
    pause = 1e-4
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise SharedWeightsError(f"{what}: waited more than sync.timeout_s={timeout_s:g}s") from None
            time.sleep(pause)
            pause = min(2 * pause, 0.01)


def _fd_of(storage: torch.UntypedStorage) -> int:
    """Move ``storage`` into file-descriptor-backed shared memory in place (torch's own way of
    sharing a CPU storage, whatever the process's sharing strategy), or just report its fd."""
    fd, _ = storage._share_fd_cpu_()
    return fd


class SharedWeights:
    """Learner rank 0's side: its weights' storages in shared memory, and the header's lock."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.token = secrets.token_bytes(16)
        self._header = torch.zeros(_HEADER.size, dtype=torch.uint8)
        self._header_fd = _fd_of(self._header.untyped_storage())
        self._segment_of: dict[int, int] = {}  # a storage's data_ptr -> its segment index
        self._segments: list[Segment] = []
        self._storages: list[torch.UntypedStorage] = []  # kept alive with their fds
        self._write(NO_VERSION)

    def _write(self, version: int) -> None:
        self._header.copy_(torch.frombuffer(bytearray(_HEADER.pack(self.token, version)), dtype=torch.uint8))

    def share(self, tensors: Iterable[torch.Tensor], reserve_bytes: int | None = None) -> str | None:
        """Move the storages behind ``tensors`` into shared memory (once each); None, or why not.

        ``reserve_bytes`` of /dev/shm are left free besides (Ray's object store lives there too:
        a full tmpfs would crash whoever writes next); by default as much as the weights."""
        storages: dict[int, torch.UntypedStorage] = {}
        for t in tensors:
            if t.device.type != "cpu":
                return f"a weight is on {t.device}"
            s = t.untyped_storage()
            if s.nbytes() and s.data_ptr() not in self._segment_of:  # an empty one has no memory to share
                storages.setdefault(s.data_ptr(), s)
        if len(self._segments) + len(storages) > MAX_SEGMENTS:
            return f"the weights lie in more than {MAX_SEGMENTS} storages"
        need = sum(s.nbytes() for s in storages.values() if not s.is_shared())
        reserve = need if reserve_bytes is None else reserve_bytes
        free = _free_bytes(SHM_DIR)
        if free is not None and need + reserve > free:
            return (f"{SHM_DIR} has {free / 2**20:.0f} MiB free, the weights need {need / 2**20:.0f} MiB and "
                    f"{reserve / 2**20:.0f} MiB are kept for Ray's object store")
        failed: list[str] = []
        with self.changing():
            for s in storages.values():
                try:
                    fd = _fd_of(s)  # in place: a copy into shared memory, then the pointer moves
                except RuntimeError as exc:  # e.g. shared already, another way
                    failed.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                    continue
                self._segment_of[s.data_ptr()] = len(self._segments)
                self._segments.append(Segment(fd, s.nbytes()))
                self._storages.append(s)
        if failed:
            return (f"{len(failed)} of {len(storages)} weight storages cannot be shared by file descriptor "
                    f"({failed[0]}): their weights go through the object store")
        return None

    @property
    def active(self) -> bool:
        return bool(self._segments)

    def locate(self, name: str, t: torch.Tensor) -> SharedTensor | None:
        """Where ``t`` lies in a shared segment, or None when it is not a view of one."""
        ptr = t.untyped_storage().data_ptr()
        seg = self._segment_of.get(ptr)
        # The storage registered for that address must still be there (nothing moved it since).
        if seg is None or self._storages[seg].data_ptr() != ptr or not t.is_contiguous() or t.numel() == 0:
            return None
        offset = t.data_ptr() - t.untyped_storage().data_ptr()
        return SharedTensor(name, seg, offset, tuple(t.shape), str(t.dtype).removeprefix("torch."))

    def handle(self) -> SharedHandle:
        return SharedHandle(os.getpid(), self.token, Segment(self._header_fd, _HEADER.size), tuple(self._segments),
                            self.timeout_s)

    @contextmanager
    def changing(self) -> Iterator[None]:
        """Around any change of the weights: no receiver reads them meanwhile, and none that
        holds an update pushed before reads them afterwards."""
        _lock(self._header_fd, fcntl.LOCK_EX, self.timeout_s, "learner rank 0 waiting for receivers to finish copying")
        try:
            self._write(NO_VERSION)
            yield
        finally:
            fcntl.flock(self._header_fd, fcntl.LOCK_UN)

    def publish(self, version: int) -> None:
        """The segments hold ``version`` from now on (until the next change)."""
        _lock(self._header_fd, fcntl.LOCK_EX, self.timeout_s, "learner rank 0 waiting for receivers to finish copying")
        try:
            self._write(version)
        finally:
            fcntl.flock(self._header_fd, fcntl.LOCK_UN)


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class _Mapping:
    """A receiver's read-only view of one sender's header and segments."""

    def __init__(self, handle: SharedHandle):
        self.pid, self.token = handle.pid, handle.token
        self.header_fd: int | None = None  # kept open for its lock; a segment's fd is closed once mapped
        self.segments: dict[int, torch.Tensor] = {}
        self.maps: list[mmap.mmap] = []
        try:
            self.header_fd = self._open(handle.header.fd)
            self.header = mmap.mmap(self.header_fd, _HEADER.size, mmap.MAP_SHARED, mmap.PROT_READ)
            self.maps.append(self.header)
            if self.read_header()[0] != self.token:
                raise SharedWeightsError(
                    f"/proc/{self.pid}/fd/{handle.header.fd} is not learner rank 0's weight header (a process of "
                    f"that pid on another host?)"
                )
        except BaseException:  # nothing half-open is left behind, whatever the failure
            self.close()
            raise

    def _open(self, fd: int) -> int:
        path = f"/proc/{self.pid}/fd/{fd}"
        try:
            return os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise SharedWeightsError(
                f"cannot open learner rank 0's shared weights at {path} ({exc.strerror}): a receiver must run on "
                f"the learner's host for sync.shared_memory; set sync.shared_memory=false to push through the "
                f"object store"
            ) from exc

    def read_header(self) -> tuple[bytes, int]:
        return _HEADER.unpack(self.header[: _HEADER.size])

    def segment(self, index: int, seg: Segment) -> torch.Tensor:
        if index not in self.segments:
            import warnings

            import numpy as np

            fd = self._open(seg.fd)
            try:
                size = os.fstat(fd).st_size
                if size < seg.nbytes:
                    raise SharedWeightsError(
                        f"learner rank 0's weight segment {index} holds {size} bytes, not {seg.nbytes}")
                m = mmap.mmap(fd, seg.nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(fd)  # the mapping keeps the memory
            self.maps.append(m)
            with warnings.catch_warnings():
                # The mapping is read-only on purpose (a receiver must never write the learner's
                # weights); receivers only copy out of it.
                warnings.simplefilter("ignore", UserWarning)
                self.segments[index] = torch.from_numpy(np.frombuffer(m, dtype=np.uint8))
        return self.segments[index]

    def close(self) -> None:
        self.segments.clear()
        for m in self.maps:
            try:
                m.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes with it
        self.maps.clear()
        if self.header_fd is not None:
            os.close(self.header_fd)
            self.header_fd = None


class SharedReader:
    """A receiver's side: keeps the sender's segments mapped from one push to the next."""

    def __init__(self):
        self._mapping: _Mapping | None = None

    def _mapped(self, handle: SharedHandle) -> _Mapping:
        m = self._mapping
        if m is None or (m.pid, m.token) != (handle.pid, handle.token):
            if m is not None:
                m.close()
            self._mapping = None
            self._mapping = m = _Mapping(handle)
        return m

    @contextmanager
    def reading(self, handle: SharedHandle, version: int,
                buckets: Iterable[tuple[SharedTensor, ...]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """The tensors of ``buckets`` as read-only views of the sender's memory, valid inside the
        block only (the learner cannot change them meanwhile)."""
        m = self._mapped(handle)
        _lock(m.header_fd, fcntl.LOCK_SH, handle.timeout_s, f"a receiver waiting for learner rank 0 to finish its step "
              f"before it reads weight version {version}")
        try:
            token, held = m.read_header()
            if held != version:
                raise SharedWeightsError(
                    f"weight version {version} is gone: learner rank 0's weights have changed since it was pushed "
                    f"(they hold {'no pushed version' if held == NO_VERSION else f'version {held}'})"
                )
            named = []
            for bucket in buckets:
                for st in bucket:
                    seg = m.segment(st.segment, handle.segments[st.segment])
                    if st.offset + st.nbytes > seg.numel():
                        raise SharedWeightsError(f"'{st.name}' lies beyond learner rank 0's weight segment {st.segment}")
                    named.append((st.name, seg[st.offset: st.offset + st.nbytes].view(getattr(torch, st.dtype)).view(st.shape)))
            yield named
        finally:
            fcntl.flock(m.header_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None
