"""The capture pipeline's storage side: batches leave the model's thread and reach the store in order.

A tap hands every captured batch to a :class:`Pipeline`. Two kinds exist, chosen by measurement
(``benchmarks/bench_pipeline.py``, numbers in ``docs/pipeline.md``):

- ``"thread"``: one background writer thread behind a bounded queue. Compression and chunk writes
  run off the model's thread; when the store falls behind, ``submit`` blocks (back-pressure) instead
  of buffering without bound, so memory stays flat however long the capture runs. This is what a
  GPU producer gets: the device-to-host copy runs on a side stream into pinned buffers
  (:class:`CudaStager`) and the writer waits for it, so neither the copy nor the write holds up
  the next forward.
- ``"inline"``: the batch is encoded (compressed into chunks) on the model's thread before the
  forward returns. On a CPU producer whose torch threads already occupy every core (2 cores here) a
  writer thread only takes cores from torch's thread team, and measured slower. What needs no CPU
  still leaves the model's thread: a local store hands the encoded chunks and the commit to
  background I/O threads (:class:`~streamtap.store.BackgroundWrites`), so the disk writes a batch
  while the model computes the next one.

``"auto"`` picks ``thread`` when the model runs on an accelerator or when the CPU has cores that
torch's intra-op threads leave free, and ``inline`` otherwise.

Per-layer terms are stacked straight into reused host buffers (:class:`BufferPool`): a fresh
batch-sized array each batch spends more time faulting its pages in than copying.

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

from ._hugepages import host_takes_freed_memory, malloc_tuning

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
        from .store import to_numpy

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
    """Hands batches to a :class:`~streamtap.store.StoreWriter`; see the module docstring."""

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
        be after this returns (see :meth:`~streamtap.store.StoreWriter.write`), or here on a failure
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


MMAP_THRESHOLD = 1 << 20        # "flat": every block above it is a mapping, returned when freed
FAST_MMAP_THRESHOLD = 512 << 20  # STREAMTAP_MALLOC_TUNING=fast: blocks below it reused from the heap
_allocator_bounded = False


def mmap_threshold(tuning: str | None, host_takes_freed_memory: bool) -> int | None:
    """The ``M_MMAP_THRESHOLD`` a tap sets for ``STREAMTAP_MALLOC_TUNING`` (None: glibc left alone).

    Measured on the GPT-2-small shape, 8 x 256 tokens (docs/pipeline.md, "Memory" and after):

    - pinned at 1 MiB (``flat``) every activation is a fresh mapping, returned when freed: the peak
      is flat from the first batch and the same in every process (the tap 185-284 MiB above the
      plain forward's peak), but each forward faults its activations in again. With torch's huge
      pages (``streamtap._hugepages``) that costs nothing measurable; with 4 KiB pages the forward
      took 20-30% longer, and in a VM whose balloon hands freed pages to its host 1.23-1.62x
      glibc's time, since there every fault goes through the hypervisor and huge pages are slower
      still. So ``auto`` (the default) pins 1 MiB except on such a VM;
    - glibc's defaults (the dynamic threshold, up to 32 MiB) reuse the activations from the heap
      and the forward runs at full speed. Before the tap reused its batch buffers, dropped the
      store's weights and shed its idle buffer set, a heap-served capture grew by hundreds of MiB
      from 10k to 100k tokens; now it settles over its first batches, as the plain forward's own
      peak does (three processes: +33, +56 and +93 MiB from 10k to 100k tokens), 56-354 MiB above
      the plain forward's settled peak (three batches of terms: 486 MiB). Both peaks move by a few
      hundred MiB between processes, and a 300k-token capture still crept, in ever rarer steps
      (+139 MiB over 145 batches): ``flat`` is for captures that run for days;
    - pinned at 512 MiB (``fast``) the batch buffers come from the heap too: 1,000 MiB above the
      plain forward's peak.
    """
    if tuning is None:
        return None
    if tuning == "fast":
        return FAST_MMAP_THRESHOLD
    if tuning == "flat":
        return MMAP_THRESHOLD
    if tuning not in ("1", "auto", "true", "yes", "on"):
        raise ValueError(f"STREAMTAP_MALLOC_TUNING must be auto (the default), flat, fast or 0, got {tuning!r}")
    return None if host_takes_freed_memory else MMAP_THRESHOLD


def bound_allocator() -> bool:
    """Set glibc's mmap threshold for a tap (:func:`mmap_threshold`), once per process.

    A user's own ``MALLOC_MMAP_THRESHOLD_`` wins, ``STREAMTAP_MALLOC_TUNING=0`` leaves the allocator
    alone, and so does the default on a VM whose balloon takes freed pages. Returns whether this
    call set it.
    """
    global _allocator_bounded
    if _allocator_bounded or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    threshold = mmap_threshold(malloc_tuning(), host_takes_freed_memory())
    if threshold is None:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        _allocator_bounded = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to tune
        return False
    return _allocator_bounded


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


class BufferPool:
    """A bounded pool of host buffer sets that captured batches are written into and reused from.

    Filling fresh arrays each batch can cost more than the copy itself: a batch-sized array above
    the allocator's mmap threshold is a fresh mapping whose pages fault in one by one; measured
    here, stacking a GPT-2-small batch's 12 layers of z into a new array took 5x as long as into a
    reused one (0.106 s vs 0.020 s per 2,048 tokens). The pool holds at
    most ``sets`` sets (the batch being produced, the queued ones and the one being written), so its
    memory is bounded too; a set is taken by :meth:`acquire` and comes back through the job's
    ``release`` once the batch is written. ``pinned``: page-locked buffers, for non-blocking copies
    from a GPU.

    ``shed``: a set given back while another is still in use lets its memory go instead of waiting
    idle. A tap takes the next batch's set while the previous one's chunks are still being written,
    so it briefly needs two; kept, the second sat through every later forward's peak (GPT-2 shape,
    1 MiB threshold: forwards 347 MiB above the plain forward's peak, with shedding 185 MiB), at
    the price of filling fresh pages each batch. Not for pinned pools, whose allocation is slow.
    """

    ROWS = 256  # buffers grow in steps of this many tokens, so a slightly longer batch reallocates once

    def __init__(self, sets: int, pinned: bool = False, shed: bool = False):
        self.max_sets = sets
        self.pinned = pinned
        self.shed = shed
        self.created = 0
        self.in_use = 0  # taken and not yet given back: being filled, queued or being written
        self.free: queue.Queue = queue.Queue()
        self._changed = threading.Condition()

    def acquire(self) -> "BufferSet":
        with self._changed:
            while self.free.empty() and self.created >= self.max_sets:
                self._changed.wait()  # until the writer gives a set back
            if self.free.empty():
                self.created += 1
                taken = BufferSet(self)
            else:
                taken = self.free.get_nowait()
            self.in_use += 1
        taken.taken, taken.handed = True, False
        return taken

    def _give_back(self, given: "BufferSet") -> None:
        """Keep ``given`` for the next batch, or, with ``shed``, let its memory go when another set is
        still in use: that one will be free for the next batch, and a set kept idle beside it would
        sit through the next forward's peak. A shed set's memory goes before a waiting ``acquire``
        may make a new one, so the pool never holds more than ``sets`` sets, even for a moment."""
        with self._changed:
            shed = self.shed and self.in_use > 1
            if not shed:
                self.in_use -= 1
                self.free.put(given)
                self._changed.notify()
                return
        given.buffers = {}
        with self._changed:
            self.in_use -= 1
            self.created -= 1
            self._changed.notify()

    def clear(self) -> None:
        """Let go of the free sets: a finished tap that the caller still holds (``tap.tokens``) must
        not keep batches of buffers alive; a second tap in the same process would make its own."""
        while True:
            try:
                self.free.get_nowait()
            except queue.Empty:
                return


class BufferSet:
    """One batch's named buffers; :meth:`take` hands out a view of the batch's shape."""

    def __init__(self, pool: BufferPool):
        self.pool = pool
        self.buffers: dict[str, torch.Tensor] = {}
        self.taken = False
        self.handed = False  # given to a pipeline, which releases it (the producer no longer may)
        self.after: BufferSet | None = None  # a set of another pool, given back with this one

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        have = self.buffers.get(name)
        rows = shape[0]
        if have is None or have.shape[1:] != tuple(shape[1:]) or have.dtype != dtype or have.shape[0] < rows:
            self.buffers.pop(name, None)  # the old one goes before the new one is made
            capacity = max(BufferPool.ROWS, -(-rows // BufferPool.ROWS) * BufferPool.ROWS)
            have = self.buffers[name] = torch.empty((capacity, *shape[1:]), dtype=dtype, pin_memory=self.pool.pinned)
        return have[:rows]

    def release(self) -> None:
        """Give the set back (once: a second call, from an error path, is a no-op)."""
        if self.taken:
            self.taken = False
            after, self.after = self.after, None
            self.pool._give_back(self)
            if after is not None:
                after.release()


class CudaStager:
    """Device-to-host copies on a side stream into a bounded pool of pinned buffers.

    Each batch's terms are copied with ``non_blocking=True`` on a stream of their own, which waits
    for the model's stream only up to the point the terms were made; the model's next layers and
    next forward keep running on the device meanwhile. The writer thread waits on the batch's event
    before it reads the buffers and gives them back to the pool after writing. The pool holds at most
    ``sets`` buffer sets (queue depth + the batch being written + the one being filled), so pinned
    memory is bounded.
    """

    def __init__(self, device: torch.device, sets: int):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.pool = BufferPool(sets, pinned=True)

    def stage(self, out: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any, Callable[[], None]]:
        bufs = self.pool.acquire()
        host = {}
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for name, t in out.items():
                view = bufs.take(name, tuple(t.shape), t.dtype)
                view.copy_(t, non_blocking=True)
                t.record_stream(self.stream)  # the allocator must not reuse t before the copy is done
                host[name] = view
            event = torch.cuda.Event()
            event.record(self.stream)
        return host, event, bufs.release


__all__ = ["bound_allocator", "Job", "Pipeline", "ThreadPipeline", "CudaStager", "BufferPool", "make_pipeline", "choose_mode", "spare_cores", "MODES"]
