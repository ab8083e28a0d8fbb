"""Host buffers that a batch's terms are copied into, reused from batch to batch, and bounded.

A tap takes a set of buffers before a forward, its sinks copy each term into it, and the set comes
back once the store holds the batch; at most ``queue_depth + 2`` sets exist (docs/pipeline.md,
"Bounded memory"). On a GPU, terms reach the host through pinned buffers on a side stream.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

import torch


class BufferPool:
    """A bounded pool of host buffer sets that captured batches are written into and reused from.

    Filling fresh arrays each batch can cost more than the copy itself (their pages fault in one by
    one; docs/benchmarks.md). The pool holds at most ``sets`` sets (the batch being produced, the queued ones and the one being written), so its
    memory is bounded too; a set is taken by :meth:`acquire` and comes back through the job's
    ``release`` once the batch is written. ``pinned``: page-locked buffers, for non-blocking copies
    from a GPU.

    ``shed``: a set given back while another is still in use lets its memory go instead of waiting
    idle. A tap takes the next batch's set while the previous one's chunks are still being written,
    so it briefly needs two; kept, the second would sit idle through every later forward's peak.
    Not for pinned pools, whose allocation is slow.
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


__all__ = ["BufferPool", "BufferSet", "CudaStager"]
