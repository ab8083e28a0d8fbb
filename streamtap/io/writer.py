"""Writing a store: creation, crash-safe appends and the committed-count protocol.

Per-token arrays are pre-allocated in capacity steps and written chunk by chunk; the committed
token and sequence counts are written last, in one update of the group's attributes. A reader
(``streamtap.open``) only ever looks below the committed count, so a crash mid-batch leaves the
store as it was after the previous batch. xarray's ``append_dim`` is avoided on purpose: it resizes
metadata before writing chunks, which leaves unopenable stores behind when killed
(docs/crash-safety.md).

This module writes numpy arrays; what torch produced becomes numpy in ``streamtap.io.pipeline``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import os
import shutil
from typing import Callable

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync
from zarr.storage import LocalStore

from ..errors import StoreAccessError, StoreExistsError, StoreFullError, StoreMismatchError, option_advice
from .direct import DirectLocalStore, direct_io_supported
from .location import (LOCK_NAME, describe, entries, is_local_path, is_streamtap_store, open_group, reaching,
                       register_writer, resolve, store_exists)
from .lock import StoreLock
from .schema import (COMMITTED_SEQUENCES, COMMITTED_TOKENS, COMPRESSED_BY_DEFAULT, COORD_DTYPES, IDENTITY, INCOMPLETE,
                     STORED_DTYPE, StoreSpec, dims_of, fill_value, static_chunks, storage_dtype)

# Blosc zstd level 1, byte shuffle, 1 MiB blocks: the best ratio of the lossless codecs on real
# activations at ~1 GB/s per core (docs/benchmarks.md, "Codecs")
COMPRESSOR = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", blocksize=1 << 20)


def check_target(target, *, append: bool = False, overwrite: bool = False, resume: bool = False,
                 break_lock: bool = False, storage_options: dict | None = None) -> None:
    """Everything about ``target`` that would stop a capture, checked before a model is loaded.

    Something that is not a streamtap store is never appended to or replaced; an existing store needs
    ``append``, ``overwrite`` or ``resume``; ``resume`` needs a store; the location must be writable;
    and a live writer's lock is reported now rather than after the model has loaded. Writes nothing:
    a directory made to test writability is removed again.
    """
    with reaching(target):
        exists = store_exists(target, storage_options)
        if exists and not is_streamtap_store(target, storage_options, or_incomplete=True):
            raise StoreExistsError(
                f"{describe(target)} exists and is not a streamtap store (a file, or a directory that streamtap "
                "did not write); streamtap never appends to or replaces it. Choose another location (--out) "
                "or remove it yourself")
        if resume and not exists:
            raise StoreExistsError(
                f"nothing to resume at {describe(target)}: there is no store there. Check the location "
                f"(--out); to start a new capture, leave out {option_advice('resume')}")
        if exists and not (append or overwrite or resume):
            raise StoreExistsError(f"a store already exists at {describe(target)}; pass --resume to continue it, "
                                   "--append to add to it or --overwrite to replace it")
        if is_local_path(target):
            _check_writable(os.fspath(target))
        if exists:
            StoreLock(writable_store(target, storage_options, direct_io=False), describe(target)).check_free(break_lock)


def _check_writable(path: str) -> None:
    """Create (and remove) what a capture would create first, so a refused permission shows now."""
    made = []
    try:
        parent = path
        while not os.path.exists(parent):
            made.append(parent)
            parent = os.path.dirname(parent) or "."
        for directory in reversed(made):
            os.mkdir(directory)
        probe = os.path.join(path, f".streamtap-write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise StoreAccessError(f"cannot write to {path} ({exc.strerror or exc}): choose a location you may write "
                               "to (--out), or fix its permissions") from None
    finally:
        for directory in made:
            try:
                os.rmdir(directory)
            except OSError:
                pass


def writable_store(target, storage_options: dict | None = None, *, direct_io: bool = True):
    """What a StoreWriter opens: a zarr store object; a directory path becomes a :class:`DirectLocalStore`
    (or zarr's ``LocalStore`` with ``direct_io=False``)."""
    if is_local_path(target):
        path = os.fspath(target)
        return DirectLocalStore(path) if direct_io and direct_io_supported() else LocalStore(path)
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
                 storage_options: dict | None = None, compress: bool | None = None, direct_io: bool = True):
        self.target = target
        self.storage_options = storage_options
        self.store = writable_store(target, storage_options, direct_io=direct_io)  # a zarr store object
        self.where = describe(target)
        self.append = append
        self.overwrite = overwrite
        self._lock: StoreLock | None = None
        self._made_dir = False    # the lock created the directory of a store that was then never written
        self._interrupted = False  # a write that did not finish: its I/O may still be in flight
        self.compress = compress  # per-token arrays compressed (COMPRESSOR), raw, or by dtype (None)
        self.group: zarr.Group | None = None
        self.tokens = 0           # committed in the store, including what an append found there
        self.sequences = 0
        self.found_tokens = 0     # what the store held before this writer appended
        self.found_sequences = 0
        self.capacity = 0
        self._arrays: dict[str, zarr.Array] = {}
        self.drain: Callable[[], None] | None = None  # waits for batches queued ahead of this writer
        with reaching(target):
            exists = store_exists(target, storage_options)
            ours = exists and is_streamtap_store(self.store, or_incomplete=True)
        if exists and not ours:
            raise StoreExistsError(
                f"{self.where} exists and is not a streamtap store (a file, or a directory that streamtap did "
                "not write); streamtap never appends to or replaces it. Choose another location (--out) or "
                "remove it yourself"
            )
        if exists and not (append or overwrite):
            raise StoreExistsError(
                f"a store already exists at {self.where!r}; pass {option_advice('append')} to add to it or "
                f"{option_advice('overwrite')} to replace it"
            )
        self._exists = exists

    # -- the single-writer lock (streamtap.io.lock) ----------------------------------------------
    def lock(self, break_lock: bool = False) -> None:
        """Take the store's writer lock (see :mod:`streamtap.io.lock`); StoreLockedError if another writer has it."""
        if self._lock is not None:
            return
        self._made_dir = is_local_path(self.target) and not os.path.exists(self.target)
        lock = StoreLock(self.store, self.where)
        try:
            with reaching(self.target):
                lock.acquire(break_lock=break_lock)
        except BaseException:
            self._remove_empty_dir()
            raise
        self._lock = lock
        if is_local_path(self.target):  # this process's readers of the store wait for what it was handed
            register_writer(self.target, self)

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
        if is_local_path(self.target):
            for entry in os.scandir(self.target):
                if entry.name == LOCK_NAME:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            return
        for name in entries(self.store):
            if name == LOCK_NAME:
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
        for name, (data, logical) in spec.static.items():
            arr = group.create_array(
                name, shape=data.shape, dtype=data.dtype, dimension_names=list(dims_of(name)),
                chunks=static_chunks(data), compressors=COMPRESSOR, fill_value=fill_value(data.dtype),
                attributes={STORED_DTYPE: logical},
            )
            _write_by_chunks(arr, data)
        coords = " ".join(spec.coords())
        for name, var in spec.variables.items():
            np_dtype = storage_dtype(var.dtype)
            group.create_array(
                name, shape=(0, *var.tail), dtype=np_dtype, dimension_names=["token", *dims_of(name)],
                chunks=spec.chunks(name), compressors=COMPRESSOR if self._compressed(var.dtype) else None,
                fill_value=fill_value(np_dtype), attributes={STORED_DTYPE: var.dtype, "coordinates": coords},
            )
        for name, np_dtype in COORD_DTYPES.items():
            group.create_array(name, shape=(0,), dtype=np_dtype, dimension_names=["token"],
                               chunks=(chunk * 16,), compressors=COMPRESSOR, fill_value=-1)
        if spec.with_text:
            group.create_array("text", shape=(0,), dtype=str, dimension_names=["token"], chunks=(chunk * 16,))
        arrays = sorted([*spec.static, *spec.variables, *spec.coords()])
        attrs = {**spec.attrs, **spec.identity, "arrays": arrays, COMMITTED_TOKENS: 0, COMMITTED_SEQUENCES: 0}
        group.attrs.put(attrs)  # one write, replacing the creation marker
        self.group = group
        self._arrays = {name: _for_appends(group[name]) for name in (*spec.variables, *spec.coords())}

    def _compressed(self, logical_dtype: str) -> bool:
        return logical_dtype in COMPRESSED_BY_DEFAULT if self.compress is None else bool(self.compress)

    def _open_existing(self, spec: StoreSpec) -> None:
        group = zarr.open_group(self.store, mode="r+", zarr_format=3)
        attrs = dict(group.attrs)
        if COMMITTED_TOKENS not in attrs:
            raise StoreExistsError(f"cannot append to {self.where}: it is a Zarr group but not a streamtap store")
        differ = [f"its {key} is {attrs.get(key)!r} but this capture's is {spec.identity.get(key)!r}"
                  for key in IDENTITY if attrs.get(key) != spec.identity.get(key)]
        if differ:
            raise StoreMismatchError(
                f"cannot append to {self.where!r}: {'; '.join(differ)}. Append only the same model, layout, "
                f"dtype and options; write to a new store or pass {option_advice('overwrite')} to replace it"
            )
        self.group = group
        # token text is kept where the store has it: an append with a tokenizer onto a store made
        # without one drops the text, one without a tokenizer onto a store with text leaves it ""
        names = [n for n in (*spec.variables, *spec.coords(), "text") if n in group]
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
        one chunk's rows it encodes them as they are, several times faster (docs/benchmarks.md,
        "Storage choices"). Only the chunks a batch starts or ends inside are merged with what the store holds.
        A local store writes the bytes out before ``done`` (see :meth:`write`); any other store might
        keep them as given (an in-memory store does), so it gets copies.
        """
        local = isinstance(self.store, (LocalStore, DirectLocalStore))

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
        """Trim capacity to what is committed, so plain ``xarray.open_zarr`` sees only real tokens.

        A writer that appended nothing still tidies an existing store: one whose writer died after
        its last commit but before closing keeps capacity beyond its committed tokens until then.
        """
        if self.group is None:
            self._tidy_existing()
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

    def _tidy_existing(self) -> None:
        if not (self._exists and self.append and self._lock is not None) or self._incomplete():
            return
        group = zarr.open_group(self.store, mode="r+", zarr_format=3)
        committed = int(group.attrs.get(COMMITTED_TOKENS, 0))
        for _, arr in group.arrays():
            dims = arr.metadata.dimension_names or ()
            if dims and dims[0] == "token" and arr.shape[0] > committed:
                arr.resize((committed, *arr.shape[1:]))

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


def _write_by_chunks(arr, data: np.ndarray) -> None:
    """Write ``data`` one chunk of rows at a time: handed the whole array, zarr encodes many chunks at
    once, and at a store's creation (the first batch's output and terms still alive) that transient
    would be the capture's peak memory."""
    if data.ndim == 0 or arr.chunks[0] >= data.shape[0]:
        arr[...] = data
        return
    rows = arr.chunks[0]
    for start in range(0, data.shape[0], rows):
        arr[start:start + rows] = data[start:start + rows]


def committed_sequences(target, storage_options: dict | None = None) -> int:
    """How many sequences a store has committed (0 if there is no store yet): where a resume starts."""
    if not store_exists(target, storage_options) or not is_streamtap_store(target, storage_options):
        return 0
    return int(open_group(target, mode="r", storage_options=storage_options).attrs[COMMITTED_SEQUENCES])


__all__ = ["StoreWriter", "writable_store", "committed_sequences", "COMPRESSOR"]
