"""Batches leave the model's thread and reach the store in order: the inline and thread writers.

A tap hands every captured batch to a :class:`Pipeline`. Two kinds exist, chosen by measurement
(``benchmarks/bench_pipeline.py``, numbers in docs/benchmarks.md):

- ``"thread"``: one background writer thread behind a bounded queue. Compression and chunk writes
  run off the model's thread; when the store falls behind, ``submit`` blocks (back-pressure) instead
  of buffering without bound, so memory stays flat however long the capture runs. This is what a
  GPU producer gets: the device-to-host copy runs on a side stream into pinned buffers
  (:class:`~streamtap.io.buffers.CudaStager`) and the writer waits for it, so neither the copy nor
  the write holds up the next forward.
- ``"inline"``: the batch is encoded (compressed into chunks) on the model's thread before the
  forward returns. On a CPU producer whose torch threads already occupy every core, a writer
  thread only takes cores from torch's thread team, and measured slower. What needs no CPU
  still leaves the model's thread: a local store hands the encoded chunks and the commit to
  background I/O threads (:class:`~streamtap.io.direct.BackgroundWrites`), so the disk writes a batch
  while the model computes the next one.

``"auto"`` picks ``thread`` when the model runs on an accelerator or when the CPU has cores that
torch's intra-op threads leave free, and ``inline`` otherwise.

The crash-safety contract of the store holds for both: a batch's chunks are written first and its
committed count last, batches are committed in the order they were fed, and a reader never sees
half a batch. A writer error is kept and raised on the model's thread at the next forward, or at
the end of the block; batches after a failed one are dropped, never committed out of order. On
leaving the block (normally or by an exception in the user's code) every batch already handed over
is written and committed before the block exits.

Ctrl-C while the model's thread writes a batch (``"inline"``) is held until that batch is committed:
zarr's I/O runs on its own event-loop thread, which an interrupted wait would leave writing behind
the interpreter's back. The KeyboardInterrupt is raised as soon as the commit has returned.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

MODES = ("auto", "thread", "inline")
DEFAULT_DEPTH = 1  # batches waiting in the queue; with the one being written and the one being
#                    produced, at most three batches of captured terms are alive at once


@dataclass
class Job:
    """One captured batch on its way to the store.

    ``arrays`` hold numpy arrays or host torch tensors (pinned, filled asynchronously when ``ready``
    is set: the writer waits on it before reading them). ``check`` gets the host tensors before the
    write (the deferred non-finite check of a GPU producer); ``release`` runs once, written or not,
    when the store no longer reads the arrays (a local store's background disk writes may).
    """

    arrays: dict[str, Any]
    n_sequences: int
    ready: Any = None                       # a torch.cuda.Event, or None when the arrays are ready
    check: Callable[[dict], None] | None = None
    release: Callable[[], None] | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # numpy arrays made on the host

    def numpy(self) -> dict[str, np.ndarray]:
        if self.ready is not None:
            self.ready.synchronize()
        if self.check is not None:
            self.check(self.arrays)
        out = {name: (to_numpy(a) if isinstance(a, torch.Tensor) else a) for name, a in self.arrays.items()}
        out.update(self.extra)
        return out


def _release(job: Job) -> None:
    if job.release is not None:
        job.release()


class Pipeline:
    """Hands batches to a :class:`~streamtap.io.writer.StoreWriter` on the caller's thread (``inline``)."""

    mode = "inline"

    def __init__(self, writer):
        self.writer = writer
        self.write_seconds = 0.0        # time spent writing (compress + store), for benchmarks
        self.written_bytes = 0          # uncompressed bytes handed to the store
        self.batches = 0

    def submit(self, job: Job) -> None:
        """Take the job: from here on its ``release`` runs exactly once, whatever happens."""
        try:
            self.raise_pending()
        except BaseException:
            _release(job)
            raise
        self._write(job)

    def _write(self, job: Job) -> None:
        """Write the job; its ``release`` runs once the store is done reading its arrays, which may
        be after this returns (see :meth:`~streamtap.io.writer.StoreWriter.write`), or here on a failure
        before the store got them."""
        try:
            arrays = job.numpy()
        except BaseException:
            _release(job)
            raise
        start = time.perf_counter()
        with sigint_deferred():
            self.writer.write(arrays, job.n_sequences, done=job.release)
        self.write_seconds += time.perf_counter() - start
        self.written_bytes += sum(a.nbytes for a in arrays.values() if isinstance(a, np.ndarray))
        self.batches += 1

    def raise_pending(self) -> None:
        """Raise a writer error on the caller's thread (none for the inline pipeline)."""

    def close(self, exc: BaseException | None = None) -> None:
        """Write and commit everything handed over; raise a writer error unless ``exc`` is in flight."""

    def busy(self) -> bool:
        """Whether a batch may still be written after :meth:`close` returned (a writer thread left running)."""
        return False


class ThreadPipeline(Pipeline):
    """One writer thread behind a queue of ``depth`` batches; ``submit`` blocks when it is full."""

    mode = "thread"

    def __init__(self, writer, depth: int = DEFAULT_DEPTH):
        super().__init__(writer)
        if depth < 1:
            raise ValueError(f"the writer queue needs a depth of at least 1, got {depth}")
        self.depth = depth
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._reported = False
        self._failed_batch = -1
        self.wait_seconds = 0.0         # time the model's thread waited on a full queue
        self._thread = threading.Thread(target=self._run, name="streamtap-writer", daemon=True)
        self._thread.start()
        writer.drain = self.drain

    _STOP = object()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is self._STOP:
                    return
                if self._error is None:  # after a failure, later batches are dropped, never committed
                    try:
                        self._write(job)  # releases the job's buffers (once the store is done with them)
                    except BaseException as exc:  # noqa: BLE001 - handed to the model's thread
                        self._error = exc
                        self._failed_batch = self.batches
                else:
                    _release(job)
            except BaseException as exc:  # noqa: BLE001 - a failing release
                self._error = self._error or exc
            finally:
                self._queue.task_done()

    def drain(self) -> None:
        """Wait until the writer thread has taken every batch handed to it (for readers in this process)."""
        if self._thread.is_alive():
            self._queue.join()

    def submit(self, job: Job) -> None:
        try:
            self.raise_pending()
            if not self._thread.is_alive():
                raise RuntimeError("the streamtap writer thread is not running (the tap was closed)")
            start = time.perf_counter()
            self._queue.put(job)  # blocks while the writer is `depth` batches behind: back-pressure
        except BaseException:
            _release(job)  # not queued: the writer thread never sees it
            raise
        self.wait_seconds += time.perf_counter() - start

    def raise_pending(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            exc = self._error
            exc.add_note(f"(raised by streamtap's background writer while writing batch {self._failed_batch} "
                         f"of this tap; the {self._failed_batch} batches before it are committed)")
            raise exc

    def busy(self) -> bool:
        return self._thread.is_alive()

    def close(self, exc: BaseException | None = None) -> None:
        if self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join()
        if exc is None:
            self.raise_pending()
        elif self._error is not None and not self._reported:
            self._reported = True
            exc.add_note(f"streamtap's background writer also failed, at batch {self._failed_batch} "
                         f"(earlier batches are committed): {type(self._error).__name__}: {self._error}")


@contextlib.contextmanager
def sigint_deferred():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise it as KeyboardInterrupt at its end.

    Only on the main thread and only while Python's default handler is installed (a program's own
    SIGINT handler is left alone).
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def spare_cores() -> int:
    """CPU cores that torch's intra-op threads leave to a writer."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, cores - torch.get_num_threads())


def choose_mode(mode: str, device: torch.device) -> str:
    if mode not in MODES:
        raise ValueError(f"writer must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if device.type != "cpu" or spare_cores() >= 1:
        return "thread"
    return "inline"


def make_pipeline(writer, mode: str, device: torch.device, depth: int = DEFAULT_DEPTH) -> Pipeline:
    mode = choose_mode(mode, device)
    return ThreadPipeline(writer, depth) if mode == "thread" else Pipeline(writer)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Bit-exact numpy view of a tensor; bfloat16 (which numpy lacks) travels as uint16 bits."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).cpu().numpy()
    return t.cpu().numpy()


__all__ = ["Job", "Pipeline", "ThreadPipeline", "make_pipeline", "choose_mode", "spare_cores", "sigint_deferred",
           "to_numpy", "MODES", "DEFAULT_DEPTH"]
