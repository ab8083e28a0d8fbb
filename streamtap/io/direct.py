"""A local directory store whose chunk files bypass the page cache and can be written in the background.

Buffered writes of fresh chunk files cost the CPU about as much as the disk takes to store them
(kernel copies and page faults), on the cores the model needs; O_DIRECT writes reach the disk for
almost no CPU, so a thread waiting on them leaves the model alone (docs/benchmarks.md). Files are
written whole to a temporary name and renamed, as zarr's own store does, so a crash never leaves a
torn chunk. Small files (metadata, short chunks) and filesystems that refuse O_DIRECT (tmpfs) are
written buffered.

Inside :meth:`DirectLocalStore.deferred`, writes go to :class:`BackgroundWrites` and return as soon
as zarr has encoded them: the model's thread goes on with the next forward while the disk takes the
batch. Chunk files land in parallel; metadata (hence a commit) is a barrier that waits for every
write before it, which keeps the commit protocol (docs/pipeline.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import mmap
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from zarr.storage import LocalStore, WrapperStore

DIRECT_MIN_BYTES = 256 << 10   # chunk files at least this big bypass the page cache
_ALIGN = 4096                  # O_DIRECT wants buffer address, length and offset aligned to the block size
_PIECE = 1 << 20               # a file is copied into the aligned buffer and written this much at a time
_aligned = threading.local()   # one aligned buffer of _PIECE bytes per writing thread


def direct_io_supported() -> bool:
    return hasattr(os, "O_DIRECT")


def _aligned_buffer() -> mmap.mmap:
    """This thread's page-aligned buffer, one fixed size whatever the chunks (so what the writing
    threads hold is a constant)."""
    buf = getattr(_aligned, "buf", None)
    if buf is None:
        _aligned.buf = buf = mmap.mmap(-1, _PIECE)
    return buf


def _temporary(path: Path) -> Path:
    return path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")


def put_direct(path: Path, data: memoryview) -> int:
    """Write a whole file with O_DIRECT, atomically (a temporary file renamed over the target).

    The length is padded to the block size for the write and the file truncated to the exact size
    after it, so the file holds exactly ``data``.
    """
    n = len(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = _aligned_buffer()
    tmp = _temporary(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    try:
        with memoryview(buf) as whole:
            for start in range(0, n, _PIECE):
                piece = data[start:start + _PIECE]
                size = len(piece)
                whole[:size] = piece
                padded = -(-size // _ALIGN) * _ALIGN  # only the last piece is short
                done = 0
                while done < padded:
                    done += os.write(fd, whole[done:padded])
        os.ftruncate(fd, n)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    tmp.replace(path)
    return n


def put_buffered(path: Path, data: memoryview) -> int:
    """Write a whole file through the page cache, atomically (a temporary file renamed over the target)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with tmp.open("wb") as f:
            n = f.write(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


@dataclass
class DiskStats:
    """Bytes written and the wall time at least one write was in flight (read by the benchmarks)."""

    bytes: int = 0
    seconds: float = 0.0
    _in_flight: int = 0
    _busy_since: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextlib.contextmanager
    def writing(self, n: int):
        with self._lock:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self.bytes += n
                if self._in_flight == 0:
                    self.seconds += time.perf_counter() - self._busy_since


class DirectLocalStore(WrapperStore[LocalStore]):
    """zarr's ``LocalStore`` with O_DIRECT chunk writes and optional background writing (see the module)."""

    def __init__(self, store: LocalStore | str | os.PathLike):
        super().__init__(store if isinstance(store, LocalStore) else LocalStore(os.fspath(store)))
        self.stats = DiskStats()
        self._direct_ok = True
        self._background: BackgroundWrites | None = None
        self._deferring = False

    @property
    def root(self) -> Path:
        return self._store.root

    def __repr__(self) -> str:
        return f"DirectLocalStore({str(self.root)!r})"

    async def set(self, key: str, value) -> None:
        if self._deferring:
            self._background.submit(self.write_file, key, value, barrier="/c/" not in key)
            return
        await asyncio.to_thread(self.write_file, key, value)

    def write_file(self, key: str, value) -> None:
        """Write one key's file now, on this thread (O_DIRECT where it pays, else buffered)."""
        data = memoryview(value.as_buffer_like()).cast("B")
        with self.stats.writing(len(data)):
            path = self.root / key
            if not self._direct_ok or len(data) < DIRECT_MIN_BYTES:
                put_buffered(path, data)
                return
            try:
                put_direct(path, data)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                self._direct_ok = False  # this filesystem takes no O_DIRECT: write through the page cache
                put_buffered(path, data)

    @contextlib.contextmanager
    def deferred(self):
        """Writes made inside the block (from zarr's sync API on this thread) go to the background."""
        if self._background is None:
            self._background = BackgroundWrites()
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def after_writes(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` once every write handed over so far has landed or failed (now, if none is pending)."""
        if self._background is None:
            fn()
        else:
            self._background.submit(fn, barrier=True, always=True)

    def settle(self) -> None:
        """Wait for the background writes; raise the first that failed (once; later ones were dropped)."""
        if self._background is not None:
            self._background.settle()

    def wait(self) -> None:
        """Wait for the background writes without taking their failure (which the writer raises)."""
        background = self._background
        if background is not None:
            background.wait()

    def stop_background(self) -> None:
        """Let the background threads go (after :meth:`settle`); a later deferred write starts new ones."""
        background, self._background = self._background, None
        if background is not None:
            background.shutdown()


class BackgroundWrites:
    """Writes in the order that keeps the commit protocol: chunk files in parallel, each barrier after all.

    A barrier (any key that is not a chunk: array and group metadata, hence the commit) starts only
    when every write handed over before it has landed, and every write after it waits for it; so the
    committed count never reaches the disk before the chunks it counts. After a failure, every later
    write is dropped (never a commit without its chunks), and :meth:`settle` raises the failure.
    A task only waits on tasks submitted before it, which a FIFO pool has already started: no deadlock.
    """

    WORKERS = 4  # chunk files in flight at once: enough to keep a local disk's queue busy

    def __init__(self, workers: int = WORKERS):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="streamtap-io")
        self._since_barrier: list = []     # writes handed over since the last barrier
        self._barrier = None               # the last barrier's future
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def submit(self, fn, *args, barrier: bool, always: bool = False) -> None:
        """``always``: run ``fn`` even after a failure (a release of the buffers the writes read)."""
        with self._lock:
            if barrier:
                waits = [f for f in (self._barrier, *self._since_barrier) if f is not None]
                self._barrier = self._pool.submit(self._run, waits, fn, args, always)
                self._since_barrier = []
            else:
                waits = [self._barrier] if self._barrier is not None else []
                self._since_barrier.append(self._pool.submit(self._run, waits, fn, args, always))

    def _run(self, waits, fn, args, always: bool) -> None:
        for f in waits:
            f.exception()  # wait; a failure there is recorded in self.error
        if self.error is not None and not always:
            return  # dropped: a write after a failed one never lands (above all not a commit)
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - kept for settle() on the writer's thread
            with self._lock:
                self.error = self.error or exc

    def wait(self) -> list:
        """Wait for every write handed over so far; returns their futures."""
        with self._lock:
            futures = [f for f in (self._barrier, *self._since_barrier) if f is not None]
        for f in futures:
            f.exception()
        return futures

    def settle(self) -> None:
        futures = self.wait()
        with self._lock:
            if futures:
                self._barrier, self._since_barrier = None, []
            error, self.error = self.error, None
        if error is not None:
            raise error

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


__all__ = ["DirectLocalStore", "BackgroundWrites", "DiskStats", "direct_io_supported", "put_direct", "put_buffered"]
