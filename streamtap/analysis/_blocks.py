"""How the analyses run over a store: one ``dask.array.blockwise`` over its token chunks.

Each task reads one chunk of the per-token variables it needs (plus the few static weights it needs,
passed as single-chunk dask arrays so that a distributed scheduler ships them once per worker, not
once per task) and returns a small per-token result. Memory is bounded by the chunk size, whatever
the number of tokens; ``st.open(path, chunks={"token": N})`` picks N.
"""

from __future__ import annotations

import functools

import dask.array as da
import numpy as np
import xarray as xr

from ._store import require, stored_name

# one letter per dimension name, so that blockwise indices follow the dataset's own dims
LETTERS = {"token": "t", "layer": "l", "head": "h", "kv_head": "k", "d_head": "e", "d_model": "m",
           "neuron": "n", "vocab": "v", "sel": "s", "row": "r", "depth": "p",
           "d_head2": "f", "two": "g", "norm": "o", "slot": "i"}


def float_dtype(dtype) -> np.dtype:
    """``dtype`` as a numpy float dtype; ``ValueError`` for anything else."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"analyses compute in a float dtype, got {dtype}")
    return dtype


def single_token(func):
    """Let an analysis take ``ds.isel(token=i)`` (no token dim) and drop the dim from its result."""

    @functools.wraps(func)
    def wrapper(ds, *args, **kwargs):
        from ..dataset import with_token_dim

        ds, squeezed = with_token_dim(ds)
        out = func(ds, *args, **kwargs)
        return out.isel(token=0) if squeezed else out

    return wrapper


def token_chunks(ds: xr.Dataset) -> tuple[int, ...]:
    """The store's token chunks (those of ``resid_final``; one chunk when it is not dask)."""
    data = ds["resid_final"].data
    if isinstance(data, da.Array):
        return data.chunks[0]
    return (ds.sizes["token"],)


def token_coords(ds: xr.Dataset) -> dict:
    """The per-token coordinates (seq, pos, token_id, text) to label per-token results with."""
    return {name: c.drop_encoding() for name, c in ds.coords.items() if c.dims == ("token",)}


def per_token(ds: xr.Dataset, name: str, chunks=None) -> xr.DataArray:
    """A per-token variable as dask, chunked along token like resid_final and whole along other dims."""
    var = ds[name]
    chunks = chunks or token_chunks(ds)
    data = var.data if isinstance(var.data, da.Array) else da.from_array(np.asarray(var.data), chunks=-1)
    spec = {i: (chunks if dim == "token" else -1) for i, dim in enumerate(var.dims)}
    return var.copy(data=data.rechunk(spec))


def static_dask(ds: xr.Dataset, name: str, dtype=np.float32) -> xr.DataArray:
    """A static weight as one dask chunk: one graph key, shipped once to each worker."""
    require(ds, name)
    var = ds[stored_name(ds, name)]
    data = var.data if isinstance(var.data, da.Array) else da.from_array(np.asarray(var.data), chunks=-1)
    return var.copy(data=data.astype(dtype).rechunk(-1))


def as_static_dask(array: np.ndarray, dims: tuple[str, ...]) -> xr.DataArray:
    """A computed static array as one dask chunk (see ``static_dask``)."""
    return xr.DataArray(da.from_array(array, chunks=-1), dims=dims)


def tokens_map(func, out_dims: tuple[str, ...], sizes: dict, per_tok: dict, statics: dict | None = None,
               *, dtype=np.float32, **kwargs) -> da.Array:
    """``func(blocks: dict[name, ndarray], **kwargs)`` over the token chunks of ``per_tok``.

    ``per_tok`` and ``statics`` map names to DataArrays; blockwise indices come from their dims, so
    equal dims must have equal sizes. ``out_dims`` starts with ``token``; the others are new axes
    of sizes ``sizes``. Returns a dask array chunked along token like the inputs.
    """
    statics = statics or {}
    names, args = [], []
    new_letters = iter(c for c in "wxyzabcdfgijoqu" if c not in LETTERS.values())
    out_letters = {}
    for dim in out_dims[1:]:
        out_letters[dim] = next(new_letters)
    for name, arr in {**per_tok, **statics}.items():
        names.append(name)
        args += [arr.data, "".join(LETTERS[d] for d in arr.dims)]
    out_ind = "t" + "".join(out_letters[d] for d in out_dims[1:])

    def call(*blocks, **kw):
        return func(dict(zip(names, blocks)), **kw)

    return da.blockwise(call, out_ind, *args, new_axes={out_letters[d]: sizes[d] for d in out_dims[1:]},
                        dtype=dtype, concatenate=True, **kwargs)


def pack(fields: dict, names: list[str]) -> np.ndarray:
    """Stack same-shaped fields along a last axis in float64 (ids up to 2**53 stay exact)."""
    return np.stack([np.asarray(fields[n], np.float64) for n in names], axis=-1)


def unpack(data, names: list[str], int_fields=()) -> dict:
    """The inverse of ``pack``: one array per name, those in ``int_fields`` back to int64."""
    return {n: (data[..., i].astype(np.int64) if n in int_fields else data[..., i]) for i, n in enumerate(names)}



# -- the stream, block by block ----------------------------------------------------------------------
def stream_inputs(ds: xr.Dataset, dtype, *, mlp: str = "mlp_out") -> tuple[dict, dict]:
    """(per-token inputs, static inputs) a block needs to replay the stream: the embedding terms, z,
    the MLP terms (``mlp``: ``mlp_out`` or ``neuron_act``), the frozen norm scales; W_O, the biases,
    the norms' gamma and beta."""
    from ..invariant import stream_events
    from ..stream import Embed

    names = [e.var for e in stream_events(ds) if isinstance(e, Embed)]
    # a pure state-space store has neither heads nor MLPs (no event reads z or mlp_out), a hybrid's mixers write mixer_out
    names += [n for n in ("z", mlp) if n in ds] + ["resid_final"] + (["norm_scale"] if "norm_weight" in ds else [])
    names += ["mixer_out"] if "mixer_out" in ds else []
    inputs = {n: per_token(ds, n) for n in names}
    statics = {n: static_dask(ds, n, dtype) for n in ("W_O", "attn_bias", "mlp_bias", "norm_weight", "norm_bias")
               if n in ds}
    return inputs, statics


def norm_center(ds: xr.Dataset) -> np.ndarray:
    """For each norm inside the stream, whether it subtracts the mean (a LayerNorm); empty without such norms."""
    return np.asarray(ds["norm_center"].values, dtype=bool) if "norm_center" in ds else np.zeros(0, bool)
