"""The Zarr store: schema, creation, crash-safe appends, and the committed-count protocol.

Per-token arrays are pre-allocated in capacity steps and written chunk by chunk; the committed
token and sequence counts are written last, in one update of the group's attributes. A reader
(``streamtap.open``) only ever looks below the committed count, so a crash mid-batch leaves the
store as it was after the previous batch. xarray's ``append_dim`` is avoided on purpose: it resizes
metadata before writing chunks, which leaves unopenable stores behind when killed.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import math
import mmap
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec
from zarr.storage import LocalStore

from .errors import StoreExistsError, StoreMismatchError

SCHEMA_VERSION = 1
COMMITTED_TOKENS = "committed_tokens"
COMMITTED_SEQUENCES = "committed_sequences"
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
            h.update(to_numpy(spec_static[name][1]).tobytes())
    return h.hexdigest()[:32]


def _is_path(target) -> bool:
    return isinstance(target, (str, os.PathLike))


def store_exists(target) -> bool:
    if _is_path(target):
        return os.path.exists(target)
    try:
        zarr.open_group(target, mode="r")
        return True
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        return False


def is_streamtap_store(target) -> bool:
    try:
        return COMMITTED_TOKENS in open_group(target, mode="r").attrs
    except Exception:  # not a zarr group at all
        return False


def open_group(target, mode: str = "r") -> zarr.Group:
    return zarr.open_group(target, mode=mode, zarr_format=3)


# -- direct I/O ----------------------------------------------------------------------------------
DIRECT_MIN_BYTES = 256 << 10   # chunk files at least this big bypass the page cache
_ALIGN = 4096                  # O_DIRECT wants buffer address, length and offset aligned to the block size
_aligned = threading.local()   # one aligned buffer per zarr pool thread, grown to the biggest chunk


def direct_io_enabled() -> bool:
    """Whether a capture into a directory writes its chunks with O_DIRECT (``STREAMTAP_DIRECT_IO=0`` turns it off)."""
    return hasattr(os, "O_DIRECT") and os.environ.get("STREAMTAP_DIRECT_IO", "1").lower() not in ("0", "false", "no", "off")


def _aligned_buffer(n: int) -> mmap.mmap:
    buf = getattr(_aligned, "buf", None)
    if buf is None or len(buf) < n:
        if buf is not None:
            buf.close()
        _aligned.buf = buf = mmap.mmap(-1, max(-(-n // _ALIGN) * _ALIGN, 1 << 20))  # page-aligned
    return buf


def _put_direct(path, data: memoryview) -> int:
    """Write a whole file with O_DIRECT, atomically (a temporary file renamed over the target).

    The length is padded to the block size for the write and the file truncated to the exact size
    after it, so the file holds exactly ``data``.
    """
    n = len(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = _aligned_buffer(n)
    buf[:n] = data
    padded = -(-n // _ALIGN) * _ALIGN
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    try:
        with memoryview(buf) as whole:
            view = whole[:padded]
            done = 0
            while done < padded:
                done += os.write(fd, view[done:])
            view.release()
        os.ftruncate(fd, n)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    tmp.replace(path)
    return n


class DirectLocalStore(LocalStore):
    """A zarr ``LocalStore`` that writes chunk files with O_DIRECT, bypassing the page cache.

    Measured here (docs/pipeline.md): buffered writes of fresh chunk files cost the CPU about as much
    as the disk takes to store them (~0.5 GB/s of kernel copying and page faults), on the same cores
    the model needs; O_DIRECT writes reach the disk at ~1.7 GB/s for almost no CPU, so a writer
    thread waiting on them leaves the model's cores alone. Files are still written whole to a
    temporary name and renamed, as zarr's own store does, so a crash never leaves a torn chunk.
    Small files (metadata, short chunks) and filesystems that refuse O_DIRECT (tmpfs) take zarr's
    ordinary path.
    """

    _direct_ok = True

    async def _set(self, key: str, value, exclusive: bool = False) -> None:
        if exclusive or not self._direct_ok or len(value) < DIRECT_MIN_BYTES:
            return await super()._set(key, value, exclusive=exclusive)
        if not self._is_open:
            await self._open()
        self._check_writable()
        data = memoryview(value.as_buffer_like()).cast("B")
        try:
            await asyncio.to_thread(_put_direct, self.root / key, data)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            self._direct_ok = False  # this filesystem takes no O_DIRECT: write as zarr does
            await super()._set(key, value, exclusive=exclusive)


def writable_store(target):
    """What a StoreWriter opens: a directory path becomes a :class:`DirectLocalStore`."""
    if _is_path(target) and direct_io_enabled():
        return DirectLocalStore(os.fspath(target))
    return target


class StoreWriter:
    """Appends captured batches to one store; creates it lazily on the first batch.

    Creation waits for the first batch so that a refused input (empty, non-finite, too long)
    never leaves an empty store that would then block a retry.
    """

    def __init__(self, target, *, append: bool = False, overwrite: bool = False):
        if append and overwrite:
            raise ValueError("append and overwrite exclude each other; pick one")
        self.target = target
        self.append = append
        self.overwrite = overwrite
        self.compress = True      # per-token arrays compressed (COMPRESSOR) or stored raw; set before prepare
        self.group: zarr.Group | None = None
        self.tokens = 0           # committed in the store, including what an append found there
        self.sequences = 0
        self.found_tokens = 0     # what the store held before this writer appended
        self.found_sequences = 0
        self.capacity = 0
        self._arrays: dict[str, zarr.Array] = {}
        exists = store_exists(target)
        if exists and overwrite and not is_streamtap_store(target):
            raise StoreExistsError(
                f"refusing to overwrite {target}: it exists but is not a streamtap store; "
                "choose another path or remove it yourself"
            )
        if exists and not (append or overwrite):
            raise StoreExistsError(
                f"a store already exists at {target!r}; pass append=True to add to it or "
                "overwrite=True to replace it (--append / --overwrite on the command line)"
            )
        self._exists = exists

    # -- lifecycle -------------------------------------------------------------------------
    def prepare(self, spec: StoreSpec) -> None:
        """Open or create the store for this spec; refuses appends that would mix models."""
        if self.group is not None:
            return
        if self._exists and self.append:
            self._open_existing(spec)
        else:
            self._create(spec)

    def _create(self, spec: StoreSpec) -> None:
        if self._exists and self.overwrite and _is_path(self.target):
            shutil.rmtree(self.target)
        group = open_group(writable_store(self.target), mode="w")
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
            arr[...] = data
        for name, var in spec.variables.items():
            np_dtype, logical = storage_dtype(var.dtype)
            group.create_array(
                name, shape=(0, *var.tail), dtype=np_dtype, dimension_names=["token", *var.dims],
                chunks=spec.chunks(name), compressors=COMPRESSOR if self.compress else None,
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
        group.attrs.update(attrs)
        self.group = group
        self._arrays = {name: group[name] for name in (*spec.variables, *self._coords(spec))}

    @staticmethod
    def _coords(spec: StoreSpec) -> list[str]:
        return [c for c in COORDS if c != "text" or spec.with_text]

    def _open_existing(self, spec: StoreSpec) -> None:
        group = open_group(writable_store(self.target), mode="r+")
        attrs = dict(group.attrs)
        keys = {**OPTIONAL_IDENTITY, **spec.identity}
        for key, want in keys.items():
            have = attrs.get(key, OPTIONAL_IDENTITY.get(key))
            if have != want:
                raise StoreMismatchError(
                    f"cannot append to {self.target!r}: its {key} is {have!r} but this capture's is "
                    f"{want!r}. Append only the same model, layout, dtype and options; write to a "
                    "new store or pass overwrite=True to replace it"
                )
        self.group = group
        # token text is kept where the store has it: an append with a tokenizer onto a store made
        # without one drops the text, one without a tokenizer onto a store with text leaves it ""
        names = [n for n in (*spec.variables, *COORDS) if n in group]
        self._arrays = {name: group[name] for name in names}
        self.tokens = self.found_tokens = int(attrs[COMMITTED_TOKENS])
        self.sequences = self.found_sequences = int(attrs[COMMITTED_SEQUENCES])
        self.capacity = min(a.shape[0] for a in self._arrays.values())

    # -- appends ---------------------------------------------------------------------------
    def write(self, batch: dict[str, np.ndarray], n_sequences: int, attrs: dict | None = None) -> None:
        """Write one batch's chunks, then commit its count; the commit is the last write.

        ``attrs`` (e.g. a lossy store's measured error) go into the same attribute update as the
        commit, so they always describe exactly the committed tokens.
        """
        n = len(batch["seq"])
        start, end = self.tokens, self.tokens + n
        if end > self.capacity:
            self._grow(end)
        for name, array in self._arrays.items():
            if name in batch:
                array[start:end] = batch[name]
        self.tokens, self.sequences = end, self.sequences + n_sequences
        self.group.attrs.update({**(attrs or {}), COMMITTED_TOKENS: self.tokens, COMMITTED_SEQUENCES: self.sequences})

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
        for arr in self._arrays.values():
            if arr.shape[0] != self.tokens:
                arr.resize((self.tokens, *arr.shape[1:]))
        self.capacity = self.tokens


def _fill(dtype: np.dtype):
    return np.nan if np.dtype(dtype).kind == "f" else 0


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


def committed_sequences(target) -> int:
    """How many sequences a store has committed (0 if there is no store yet): where a resume starts."""
    if not store_exists(target) or not is_streamtap_store(target):
        return 0
    return int(open_group(target, mode="r").attrs[COMMITTED_SEQUENCES])
