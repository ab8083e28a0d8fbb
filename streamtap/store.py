"""The Zarr store: schema, creation, crash-safe appends, and the committed-count protocol.

Per-token arrays are pre-allocated in capacity steps and written chunk by chunk; the committed
token and sequence counts are written last, in one update of the group's attributes. A reader
(``streamtap.open``) only ever looks below the committed count, so a crash mid-batch leaves the
store as it was after the previous batch. xarray's ``append_dim`` is avoided on purpose: it resizes
metadata before writing chunks, which leaves unopenable stores behind when killed.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import hashlib
import json
import math
import mmap
import os
import shutil
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync
from zarr.storage import LocalStore

from .errors import StoreExistsError, StoreFullError, StoreMismatchError, StreamtapError
from .lock import LOCK_KEY, StoreLock

SCHEMA_VERSION = 1
COMMITTED_TOKENS = "committed_tokens"
COMMITTED_SEQUENCES = "committed_sequences"
INCOMPLETE = "streamtap_incomplete"      # the only attribute of a store whose creation has not finished
STORED_DTYPE = "streamtap_dtype"          # attribute naming the logical dtype (bfloat16 kept as bits)
COORDS = ("seq", "pos", "token_id", "text")
# identity attributes newer than schema 1's first stores: absent means the default, so stores written
# before them still accept appends, and an append that differs from the default is refused
OPTIONAL_IDENTITY = {"materialized": False, "store_dtype": None}
CHUNK_TARGET_BYTES = 4 << 20              # chunks below ~1 MB collapse write throughput
# Blosc zstd level 1, byte shuffle, 1 MiB blocks: the best ratio of the lossless codecs on real
# activations (float32 1.08x, bfloat16/float16 1.07-1.26x) at ~1 GB/s per core; lz4 is twice as
# fast but saves only 1-2%. Measured in benchmarks/bench_pipeline.py, numbers in docs/pipeline.md.
COMPRESSOR = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", blocksize=1 << 20)
# Which per-token arrays are compressed unless the capture says otherwise: only where it pays. On
# real text float32 and float16 terms shrink 1.08x, and encoding them cost the model's thread
# 0.2-0.3 s of a 2.2-3.3 s batch on a fast CPU (docs/pipeline.md, "Codec"); bfloat16 shrinks 1.27x.
COMPRESSED_BY_DEFAULT = ("bfloat16",)
LOSSY_DTYPES = ("float16", "bfloat16")   # what a capture may store instead of the compute dtype
LOSSY_ERROR_TOKENS = 2048                # tokens of each end of a lossy store the capture measures


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Bit-exact numpy view of a tensor; bfloat16 (which numpy lacks) travels as uint16 bits."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).cpu().numpy()
    return t.cpu().numpy()


def storage_dtype(dtype: torch.dtype) -> tuple[np.dtype, str]:
    """(numpy dtype on disk, logical dtype name) for a torch dtype."""
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.bfloat16:
        return np.dtype("uint16"), name
    return np.dtype(name), name


@dataclass
class VariableSpec:
    dims: tuple[str, ...]
    tail: tuple[int, ...]          # shape after the token dimension
    dtype: torch.dtype


@dataclass
class StoreSpec:
    """Everything needed to create a store, or to check that an append belongs in one."""

    variables: dict[str, VariableSpec]
    static: dict[str, tuple[tuple[str, ...], torch.Tensor]]
    attrs: dict[str, Any]
    with_text: bool
    identity: dict[str, Any] = field(default_factory=dict)

    def chunk_tokens(self) -> int:
        """Tokens per chunk, the same for every per-token variable, sized by the widest factored one.

        Materialized ``messages`` are left out of the choice (they are chunked along layers too, see
        :meth:`chunks`), so the factored variables keep chunks of ~1-4 MB either way.
        """
        widest = max(math.prod(v.tail) * v.dtype.itemsize for name, v in self.variables.items()
                     if name != "messages")
        return int(min(4096, max(16, 2 ** round(math.log2(CHUNK_TARGET_BYTES / widest)))))

    def chunks(self, name: str) -> tuple[int, ...]:
        var, tokens = self.variables[name], self.chunk_tokens()
        if name != "messages":
            return (tokens, *var.tail)
        per_layer = tokens * math.prod(var.tail[1:]) * var.dtype.itemsize
        layers = int(min(var.tail[0], max(1, CHUNK_TARGET_BYTES // per_layer)))
        return (tokens, layers, *var.tail[1:])


def fingerprint(spec_static: dict[str, tuple[tuple[str, ...], torch.Tensor]]) -> str:
    """A hash of the weights that define the terms, so an append from another model is refused."""
    h = hashlib.sha256()
    for name in ("W_O", "attn_bias", "mlp_bias", "final_norm_weight"):
        if name in spec_static:
            h.update(name.encode())
            h.update(np.ascontiguousarray(to_numpy(spec_static[name][1])))  # no copy of a contiguous array
    return h.hexdigest()[:32]


def is_url(target) -> bool:
    """A store named by URL (``s3://bucket/run.zarr``, ``gs://``, ``memory://``...): opened through fsspec."""
    return isinstance(target, str) and "://" in target


def _is_path(target) -> bool:
    """A local directory (a path, not a URL and not a zarr store object)."""
    return isinstance(target, (str, os.PathLike)) and not is_url(target)


def fs_options(url: str, storage_options: dict | None = None) -> dict:
    """The fsspec options for a store URL: the caller's, with directory-listing caches off on object
    storage (another process, a writer or a resume, changes the store behind a cached listing)."""
    options = dict(storage_options or {})
    if url.split("://", 1)[0] in ("s3", "s3a", "gs", "gcs"):
        options.setdefault("use_listings_cache", False)
    return options


def resolve(target, storage_options: dict | None = None):
    """What zarr opens for ``target``: a URL becomes an fsspec store (``storage_options`` go to its
    filesystem, e.g. ``{"endpoint_url": ...}``; s3fs also reads ``AWS_ENDPOINT_URL`` and the usual AWS
    variables), a local path and a zarr store object are returned as they are."""
    if not is_url(target):
        if storage_options:
            raise StreamtapError(f"storage_options apply to URLs such as s3://bucket/run.zarr, not to {target!r}")
        if _is_path(target):
            wait_for_local_writes(target)
        return target
    from zarr.storage import FsspecStore

    try:
        return FsspecStore.from_url(target, storage_options=fs_options(target, storage_options))
    except ImportError as exc:
        raise StreamtapError(f"cannot open {target}: {exc} (for s3:// install s3fs: pip install s3fs)") from None


def _entries(store) -> list[str]:
    """The names at the root of a zarr store object (empty when there is nothing there yet)."""
    async def listing():
        return [key async for key in store.list_dir("")]

    try:
        return sync(listing())
    except FileNotFoundError:
        return []


def store_exists(target, storage_options: dict | None = None) -> bool:
    """Whether anything but a writer's lock is at ``target``."""
    if _is_path(target):
        if os.path.isdir(target):
            return any(name != LOCK_KEY for name in os.listdir(target))
        return os.path.exists(target)
    return any(name != LOCK_KEY for name in _entries(resolve(target, storage_options)))


def is_streamtap_store(target, storage_options: dict | None = None) -> bool:
    try:
        return COMMITTED_TOKENS in open_group(target, mode="r", storage_options=storage_options).attrs
    except Exception:  # not a zarr group at all
        return False


def open_group(target, mode: str = "r", storage_options: dict | None = None) -> zarr.Group:
    return zarr.open_group(resolve(target, storage_options), mode=mode, zarr_format=3)


def where(target) -> str:
    """How messages name a store."""
    return os.fspath(target) if isinstance(target, (str, os.PathLike)) else repr(target)


# -- direct I/O ----------------------------------------------------------------------------------
DIRECT_MIN_BYTES = 256 << 10   # chunk files at least this big bypass the page cache
_ALIGN = 4096                  # O_DIRECT wants buffer address, length and offset aligned to the block size
_PIECE = 1 << 20               # a file is copied into the aligned buffer and written this much at a time
_aligned = threading.local()   # one aligned buffer of _PIECE bytes per writing thread


def direct_io_enabled() -> bool:
    """Whether a capture into a directory writes its chunks with O_DIRECT (``STREAMTAP_DIRECT_IO=0`` turns it off)."""
    return hasattr(os, "O_DIRECT") and os.environ.get("STREAMTAP_DIRECT_IO", "1").lower() not in ("0", "false", "no", "off")


def _aligned_buffer() -> mmap.mmap:
    """This thread's aligned buffer: one fixed size, however big the chunks, so that what the writing
    threads hold is a constant (a buffer grown to the biggest chunk made the peak RSS depend on
    which threads happened to take the big chunks). Writes of 1 MiB pieces are as fast as whole
    4 MiB files here (1.43 vs 1.37 GB/s, O_DIRECT)."""
    buf = getattr(_aligned, "buf", None)
    if buf is None:
        _aligned.buf = buf = mmap.mmap(-1, _PIECE)  # page-aligned
    return buf


def _put_direct(path, data: memoryview) -> int:
    """Write a whole file with O_DIRECT, atomically (a temporary file renamed over the target).

    The length is padded to the block size for the write and the file truncated to the exact size
    after it, so the file holds exactly ``data``.
    """
    n = len(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = _aligned_buffer()
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
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


class DirectLocalStore(LocalStore):
    """A zarr ``LocalStore`` that writes chunk files with O_DIRECT, bypassing the page cache, and can
    leave the writing to background threads.

    Measured here (docs/pipeline.md): buffered writes of fresh chunk files cost the CPU about as much
    as the disk takes to store them (~0.5 GB/s of kernel copying and page faults), on the same cores
    the model needs; O_DIRECT writes reach the disk at ~1.7 GB/s for almost no CPU, so a thread
    waiting on them leaves the model's cores alone. Files are still written whole to a temporary
    name and renamed, as zarr's own store does, so a crash never leaves a torn chunk. Small files
    (metadata, short chunks) and filesystems that refuse O_DIRECT (tmpfs) take zarr's ordinary path.

    Inside :meth:`deferred`, writes are handed to :class:`BackgroundWrites` and the call returns as
    soon as the data is encoded: the model's thread compresses a batch (CPU work it would have to
    share with the model anyway) and goes on with the next forward while the disk takes the batch.
    :meth:`settle` waits for them.
    """

    _direct_ok = True
    _background: "BackgroundWrites | None" = None
    _deferring = False

    async def _set(self, key: str, value, exclusive: bool = False) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        if self._deferring and not exclusive:
            self._background.submit(self._write_now, key, value, barrier="/c/" not in key)
            return
        await asyncio.to_thread(self._write_now, key, value, exclusive)

    # disk accounting for benchmarks: bytes written and the wall time at least one write was in flight
    io_bytes = 0
    io_seconds = 0.0
    _in_flight = 0
    _busy_since = 0.0
    _io_lock = threading.Lock()

    def _write_now(self, key: str, value, exclusive: bool = False) -> None:
        with self._io_lock:
            if self._in_flight == 0:
                self._busy_since = time.perf_counter()
            self._in_flight += 1
        try:
            self._write_file(key, value, exclusive)
        finally:
            with self._io_lock:
                self._in_flight -= 1
                self.io_bytes += len(value)
                if self._in_flight == 0:
                    self.io_seconds += time.perf_counter() - self._busy_since

    def _write_file(self, key: str, value, exclusive: bool = False) -> None:
        if exclusive or not self._direct_ok or len(value) < DIRECT_MIN_BYTES:
            _put_buffered(self.root / key, value, exclusive=exclusive)
            return
        data = memoryview(value.as_buffer_like()).cast("B")
        try:
            _put_direct(self.root / key, data)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            self._direct_ok = False  # this filesystem takes no O_DIRECT: write as zarr does
            _put_buffered(self.root / key, value, exclusive=exclusive)

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
        from concurrent.futures import ThreadPoolExecutor

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


_writing: "weakref.WeakValueDictionary[str, StoreWriter]" = weakref.WeakValueDictionary()


def wait_for_local_writes(path) -> None:
    """Read your own writes: a store this process is writing is brought up to date before it is read.

    A capture's last batch is committed shortly after the forward returns (a writer thread's queue,
    the background disk writes); another process sees the store at its previous commit until then
    (always consistent), and this one waits for it.
    """
    writer = _writing.get(os.path.realpath(os.fspath(path)))
    if writer is not None:
        writer.wait()


def _put_buffered(path, value, exclusive: bool = False) -> None:
    """zarr's own local write: a temporary file renamed over the target."""
    from zarr.storage._local import _put

    _put(path, value, exclusive=exclusive)


def writable_store(target, storage_options: dict | None = None):
    """What a StoreWriter opens: a zarr store object; a directory path becomes a :class:`DirectLocalStore`."""
    if _is_path(target):
        return (DirectLocalStore if direct_io_enabled() else LocalStore)(os.fspath(target))
    return resolve(target, storage_options)


def _is_full(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) says the disk or the quota is full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(exc, getattr(builtins, "BaseExceptionGroup", ())):
            return any(_is_full(e) for e in exc.exceptions)
        exc = exc.__cause__ or exc.__context__
    return False


class StoreWriter:
    """Appends captured batches to one store; creates it lazily on the first batch.

    Creation waits for the first batch so that a refused input (empty, non-finite, too long)
    never leaves an empty store that would then block a retry.
    """

    def __init__(self, target, *, append: bool = False, overwrite: bool = False,
                 storage_options: dict | None = None):
        if append and overwrite:
            raise ValueError("append and overwrite exclude each other; pick one")
        self.target = target
        self.storage_options = storage_options
        self.store = writable_store(target, storage_options)  # a zarr store object
        self.where = where(target)
        self.append = append
        self.overwrite = overwrite
        self._lock: StoreLock | None = None
        self._made_dir = False    # the lock created the directory of a store that was then never written
        self._interrupted = False  # a write that did not finish: its I/O may still be in flight
        self.compress: bool | None = None  # per-token arrays compressed (COMPRESSOR), raw, or by dtype
        #                                     (None: COMPRESSED_BY_DEFAULT); set before prepare
        self.group: zarr.Group | None = None
        self.tokens = 0           # committed in the store, including what an append found there
        self.sequences = 0
        self.found_tokens = 0     # what the store held before this writer appended
        self.found_sequences = 0
        self.capacity = 0
        self._arrays: dict[str, zarr.Array] = {}
        self.drain: Callable[[], None] | None = None  # waits for batches queued ahead of this writer
        exists = store_exists(target, storage_options)
        if exists and overwrite and not is_streamtap_store(self.store):
            raise StoreExistsError(
                f"refusing to overwrite {self.where}: it exists but is not a streamtap store; "
                "choose another path or remove it yourself"
            )
        if exists and not (append or overwrite):
            raise StoreExistsError(
                f"a store already exists at {self.where!r}; pass append=True to add to it or "
                "overwrite=True to replace it (--append / --overwrite on the command line)"
            )
        self._exists = exists

    # -- the single-writer lock (streamtap.lock) -------------------------------------------------
    def lock(self, break_lock: bool = False) -> None:
        """Take the store's writer lock (see :mod:`streamtap.lock`); StoreLockedError if another writer has it."""
        if self._lock is not None:
            return
        self._made_dir = _is_path(self.target) and not os.path.exists(self.target)
        lock = StoreLock(self.store, self.where)
        try:
            lock.acquire(break_lock=break_lock)
        except BaseException:
            self._remove_empty_dir()
            raise
        self._lock = lock
        if _is_path(self.target):  # this process's readers of the store wait for what it was handed
            _writing[os.path.realpath(os.fspath(self.target))] = self

    def unlock(self) -> None:
        """Release the lock; a directory that only the lock had created goes with it."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()
        self._remove_empty_dir()

    def _remove_empty_dir(self) -> None:
        if self._made_dir and self.group is None:
            try:
                os.rmdir(self.target)  # only if empty: a store another writer began is left alone
            except OSError:
                pass

    # -- lifecycle -------------------------------------------------------------------------
    def prepare(self, spec: StoreSpec) -> None:
        """Open or create the store for this spec; refuses appends that would mix models."""
        if self.group is not None:
            return
        try:
            if self._exists and self.append and not self._incomplete():
                self._open_existing(spec)
            else:
                self._create(spec)
        except OSError as exc:
            if _is_full(exc):
                raise self._full(exc, "while creating the store") from exc
            raise

    def _incomplete(self) -> bool:
        """A store whose creation a crash or a full disk interrupted: nothing was ever committed to it."""
        try:
            attrs = dict(zarr.open_group(self.store, mode="r", zarr_format=3).attrs)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
            return False
        return attrs.get(INCOMPLETE) is True and COMMITTED_TOKENS not in attrs

    def _clear(self) -> None:
        """Remove everything in the store but the lock (the writer holds it while it replaces the store)."""
        if _is_path(self.target):
            for entry in os.scandir(self.target):
                if entry.name == LOCK_KEY:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            return
        for name in _entries(self.store):
            if name == LOCK_KEY:
                continue
            try:
                sync(self.store.delete_dir(name))  # an array's prefix (object storage: every key under it)
            except ValueError:
                pass  # a LocalStore refuses delete_dir on a file (zarr.json); delete below takes it
            sync(self.store.delete(name))

    def _create(self, spec: StoreSpec) -> None:
        if self._exists:  # overwrite, or an append onto a store whose creation never finished
            self._clear()
        # the creation marker is the group's only attribute until the first commit replaces them all
        group = zarr.open_group(self.store, mode="a", zarr_format=3, attributes={INCOMPLETE: True})
        chunk = spec.chunk_tokens()
        for name, tensor_spec in spec.static.items():
            dims, tensor = tensor_spec
            data = to_numpy(tensor)
            _, logical = storage_dtype(tensor.dtype)
            arr = group.create_array(
                name, shape=data.shape, dtype=data.dtype, dimension_names=list(dims),
                chunks=_static_chunks(data), compressors=COMPRESSOR, fill_value=_fill(data.dtype),
                attributes={STORED_DTYPE: logical},
            )
            _write_by_chunks(arr, data)
        for name, var in spec.variables.items():
            np_dtype, logical = storage_dtype(var.dtype)
            group.create_array(
                name, shape=(0, *var.tail), dtype=np_dtype, dimension_names=["token", *var.dims],
                chunks=spec.chunks(name), compressors=COMPRESSOR if self._compressed(logical) else None,
                fill_value=_fill(np_dtype),
                attributes={STORED_DTYPE: logical, "coordinates": " ".join(self._coords(spec))},
            )
        for name, np_dtype in (("seq", "int64"), ("pos", "int32"), ("token_id", "int64")):
            group.create_array(name, shape=(0,), dtype=np_dtype, dimension_names=["token"],
                               chunks=(chunk * 16,), compressors=COMPRESSOR, fill_value=-1)
        if spec.with_text:
            group.create_array("text", shape=(0,), dtype=str, dimension_names=["token"],
                               chunks=(chunk * 16,))
        attrs = dict(spec.attrs)
        attrs.update({k: v for k, v in spec.identity.items() if OPTIONAL_IDENTITY.get(k, object()) != v})
        attrs.update({COMMITTED_TOKENS: 0, COMMITTED_SEQUENCES: 0})
        group.attrs.put(attrs)  # one write, replacing the creation marker
        self.group = group
        self._arrays = {name: _for_appends(group[name]) for name in (*spec.variables, *self._coords(spec))}

    def _compressed(self, logical_dtype: str) -> bool:
        return logical_dtype in COMPRESSED_BY_DEFAULT if self.compress is None else bool(self.compress)

    @staticmethod
    def _coords(spec: StoreSpec) -> list[str]:
        return [c for c in COORDS if c != "text" or spec.with_text]

    def _open_existing(self, spec: StoreSpec) -> None:
        group = zarr.open_group(self.store, mode="r+", zarr_format=3)
        attrs = dict(group.attrs)
        if COMMITTED_TOKENS not in attrs:
            raise StoreExistsError(f"cannot append to {self.where}: it is a Zarr group but not a streamtap store")
        keys = {**OPTIONAL_IDENTITY, **spec.identity}
        for key, want in keys.items():
            have = attrs.get(key, OPTIONAL_IDENTITY.get(key))
            if have != want:
                raise StoreMismatchError(
                    f"cannot append to {self.where!r}: its {key} is {have!r} but this capture's is "
                    f"{want!r}. Append only the same model, layout, dtype and options; write to a "
                    "new store or pass overwrite=True to replace it"
                )
        self.group = group
        # token text is kept where the store has it: an append with a tokenizer onto a store made
        # without one drops the text, one without a tokenizer onto a store with text leaves it ""
        names = [n for n in (*spec.variables, *COORDS) if n in group]
        self._arrays = {name: _for_appends(group[name]) for name in names}
        self.tokens = self.found_tokens = int(attrs[COMMITTED_TOKENS])
        self.sequences = self.found_sequences = int(attrs[COMMITTED_SEQUENCES])
        self.capacity = min(a.shape[0] for a in self._arrays.values())

    # -- appends ---------------------------------------------------------------------------
    def write(self, batch: dict[str, np.ndarray], n_sequences: int, attrs: dict | None = None,
              done: Callable[[], None] | None = None) -> None:
        """Write one batch's chunks, then commit its count; the commit is the last write.

        ``attrs`` (e.g. a lossy store's measured error) go into the same attribute update as the
        commit, so they always describe exactly the committed tokens.

        A local store may still be reading the batch's arrays after this returns (uncompressed
        chunks go to the disk straight from them, without a copy); ``done`` is called, exactly once
        and whatever happened, when it no longer does: that is when the caller may reuse them.

        A full disk raises :class:`~streamtap.errors.StoreFullError`; the store keeps what was
        committed before (chunks are written whole to a temporary name and renamed, and the commit
        comes last). Before writing, the writer checks that its lock is still its own.
        """
        try:
            self._write(batch, n_sequences, attrs)
        finally:
            if done is not None:
                if hasattr(self.store, "after_writes"):
                    self.store.after_writes(done)
                else:
                    done()

    def _write(self, batch: dict[str, np.ndarray], n_sequences: int, attrs: dict | None) -> None:
        self.settle()  # the previous batch's background writes: done, or their failure raised here
        if self._lock is not None:
            self._lock.check()
        n = len(batch["seq"])
        start, end = self.tokens, self.tokens + n
        self._interrupted = True  # until the commit below has returned
        try:
            if end > self.capacity:
                self._grow(end)
            with self._deferred():  # a local store writes the chunks and the commit in the background
                self._put_chunks(batch, start, end)
                sequences = self.sequences + n_sequences
                # one write of zarr.json: ``group.attrs.update`` would write it once per key, and a kill
                # between those writes left a committed token count without its sequence count (bench_crash)
                self.group.update_attributes({**(attrs or {}), COMMITTED_TOKENS: end, COMMITTED_SEQUENCES: sequences})
        except Exception as exc:
            self._interrupted = False  # an error, not an interruption: zarr's I/O for it has ended
            if isinstance(exc, OSError) and _is_full(exc):
                raise self._full(exc, f"while writing a batch of {n:,} tokens") from exc
            raise
        self._interrupted = False
        self.tokens, self.sequences = end, sequences

    PUT_GROUP = 8  # pieces handed to zarr at once (see _put_chunks)

    def _put_chunks(self, batch: dict[str, np.ndarray], start: int, end: int) -> None:
        """Every array's rows ``start:end``, one chunk per zarr write, ``PUT_GROUP`` writes at a time.

        Handed a whole batch, zarr builds each chunk in a new fill-valued array and copies the
        batch into it, on its event loop's one thread, and scans it for being empty; handed exactly
        one chunk's rows it encodes them as they are. Measured (SmolLM2-shaped batch, 293 MB,
        uncompressed, this 2-core machine): 0.22 s and 81k page faults per batch against 0.05 s and
        14k. Only the chunks a batch starts or ends inside are merged with what the store holds.
        A local store writes the bytes out before ``done`` (see :meth:`write`); any other store might
        keep them as given (an in-memory store does), so it gets copies.
        """
        local = isinstance(self.store, LocalStore)

        pieces = [(array, a, b, batch[name][a - start:b - start])
                  for name, array in self._arrays.items() if name in batch
                  for a, b in _chunk_pieces(start, end, array.chunks[0])]

        async def put_all():
            # in groups: zarr encodes every piece of one gather before the first reaches the store, so
            # one gather of a whole batch kept the disk idle while it ran (11 s of a 1.57 GB batch)
            for i in range(0, len(pieces), self.PUT_GROUP):
                await asyncio.gather(*(array.async_array.setitem(slice(a, b), rows if local else rows.copy())
                                       for array, a, b, rows in pieces[i:i + self.PUT_GROUP]))

        sync(put_all())

    def wait(self) -> None:
        """Wait until every batch handed to this writer is committed (errors stay the writer's to raise)."""
        if self.drain is not None:
            self.drain()
        wait = getattr(self.store, "wait", None)
        if wait is not None:
            wait()

    def _deferred(self):
        deferred = getattr(self.store, "deferred", None)
        return deferred() if deferred is not None else contextlib.nullcontext()

    def settle(self) -> None:
        """Wait until every batch :meth:`write` returned from is on disk and committed.

        A batch whose background writes failed was never committed (its commit is dropped): the
        counts go back to what the store holds and the failure is raised, a full disk as
        :class:`~streamtap.errors.StoreFullError`.
        """
        settle = getattr(self.store, "settle", None)
        if settle is None:
            return
        try:
            settle()
        except Exception as exc:
            attrs = dict(zarr.open_group(self.store, mode="r", zarr_format=3).attrs)
            self.tokens = int(attrs.get(COMMITTED_TOKENS, self.found_tokens))
            self.sequences = int(attrs.get(COMMITTED_SEQUENCES, self.found_sequences))
            if isinstance(exc, OSError) and _is_full(exc):
                raise self._full(exc, "while writing a batch in the background") from exc
            raise

    def _full(self, exc: OSError, doing: str) -> StoreFullError:
        err = StoreFullError(
            errno.ENOSPC,
            f"the disk holding {self.where} is full ({exc.strerror or exc}) {doing}. The store stays valid "
            f"at its last committed batch: {self.tokens:,} tokens in {self.sequences:,} sequences. Free some "
            "space (or move the store), then resume: streamtap.capture(..., resume=True), or the same "
            "`streamtap capture` command with --resume; a tap continues with append=True")
        err.tokens, err.sequences = self.tokens, self.sequences
        return err

    def _grow(self, needed: int) -> None:
        chunk = next(iter(self._arrays.values())).chunks[0]
        capacity = max(needed, 2 * self.capacity)
        capacity = -(-capacity // chunk) * chunk
        for arr in self._arrays.values():
            arr.resize((capacity, *arr.shape[1:]))
        self.capacity = capacity

    def close(self) -> None:
        """Trim capacity to what is committed, so plain ``xarray.open_zarr`` sees only real tokens."""
        if self.group is None:
            return
        failed = None
        try:
            self.settle()  # the last batch's background writes (a failure there is raised after the trim)
        except Exception as exc:
            failed = exc
        finally:
            if isinstance(self.store, DirectLocalStore):
                self.store.stop_background()
        if not self._interrupted:  # an interrupted write may still be landing: leave the capacity
            self._trim()
        if failed is not None:
            raise failed

    def _trim(self) -> None:
        try:
            for arr in self._arrays.values():
                if arr.shape[0] != self.tokens:
                    arr.resize((self.tokens, *arr.shape[1:]))
        except OSError as exc:
            if not _is_full(exc):
                raise
            return  # no room even for the trim: the capacity stays, which readers ignore
        self.capacity = self.tokens


def _chunk_pieces(start: int, end: int, chunk: int):
    """``start:end`` cut at chunk boundaries: (a, b) pairs, each inside one chunk."""
    a = start
    while a < end:
        b = min(end, (a // chunk + 1) * chunk)
        yield a, b
        a = b


def _for_appends(array: zarr.Array) -> zarr.Array:
    """The array as a writer appends to it: every chunk written, none first scanned for being empty
    (a captured chunk never is; the scan read every byte of the batch once more)."""
    return array.with_config({"write_empty_chunks": True})


def _fill(dtype: np.dtype):
    return np.nan if np.dtype(dtype).kind == "f" else 0


def _write_by_chunks(arr, data: np.ndarray) -> None:
    """Write ``data`` one chunk of rows at a time: handed the whole array, zarr encodes many chunks at
    once, and at a store's creation (the first batch's output and terms still alive) that transient
    was the capture's peak (GPT-2 shape: ~60 MiB for the unembedding and the per-head weights)."""
    if data.ndim == 0 or arr.chunks[0] >= data.shape[0]:
        arr[...] = data
        return
    rows = arr.chunks[0]
    for start in range(0, data.shape[0], rows):
        arr[start:start + rows] = data[start:start + rows]


def _static_chunks(data: np.ndarray) -> tuple[int, ...]:
    if data.nbytes <= CHUNK_TARGET_BYTES * 4 or data.ndim == 0:
        return data.shape
    rows = max(1, CHUNK_TARGET_BYTES // (data[0].nbytes or 1))
    return (rows, *data.shape[1:])


def describe_config(config) -> str:
    """The model config as JSON text for the store's attributes."""
    try:
        return config.to_json_string(use_diff=False)
    except Exception:  # configs with non-JSON members still get a readable record
        return json.dumps({k: repr(v) for k, v in vars(config).items()})


def committed_sequences(target, storage_options: dict | None = None) -> int:
    """How many sequences a store has committed (0 if there is no store yet): where a resume starts."""
    if not store_exists(target, storage_options) or not is_streamtap_store(target, storage_options):
        return 0
    return int(open_group(target, mode="r", storage_options=storage_options).attrs[COMMITTED_SEQUENCES])
