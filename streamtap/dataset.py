"""Reading a store back: an xarray Dataset over the committed tokens, with derived terms lazily.

Only ``committed_tokens`` rows are exposed, whatever capacity the arrays have, so a store that a
crash interrupted opens at its last complete batch. bfloat16 arrays (kept as their uint16 bit
patterns because numpy and zarr 3.1 lack the type) are decoded to float32 lazily, which is exact.
"""

from __future__ import annotations

import builtins

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from .store import COMMITTED_TOKENS, COORDS, STORED_DTYPE, SCHEMA_VERSION, open_group
from .errors import StreamtapError
from .ranks import rank_stores


def _bits_to_float32(block: np.ndarray) -> np.ndarray:
    return (block.astype(np.uint32) << 16).view(np.float32)


def _decode(var: xr.DataArray) -> xr.DataArray:
    if var.attrs.get(STORED_DTYPE) == "bfloat16" and var.dtype == np.uint16:
        data = var.data
        if isinstance(data, da.Array):
            data = data.map_blocks(_bits_to_float32, dtype=np.float32)
        else:
            data = _bits_to_float32(np.asarray(data))
        var = var.copy(data=data)
    return var


def open(store, *, chunks: dict | None = None) -> xr.Dataset:  # noqa: A001 - mirrors xarray.open_*
    """Open a store as a dask-backed Dataset with ``messages`` (and ``neuron_out``) derived lazily.

    ``chunks`` is passed to ``xarray.open_zarr`` (``{"token": 4096}`` to read bigger blocks).
    """
    ranks = rank_stores(store)
    if ranks:
        return _open_ranks(ranks, chunks)
    where = str(store)
    try:
        group = open_group(store, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError) as exc:
        raise StreamtapError(f"no streamtap store at {where} ({type(exc).__name__}); give the store's "
                             "top directory, the one that `streamtap capture --out` wrote") from None
    attrs = dict(group.attrs)
    if COMMITTED_TOKENS not in attrs:
        raise StreamtapError(f"{where} is a Zarr group but not a streamtap store (no {COMMITTED_TOKENS})")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StreamtapError(
            f"{where} has schema version {attrs.get('schema_version')}, this streamtap reads "
            f"{SCHEMA_VERSION}; install a matching streamtap version"
        )
    committed = int(attrs[COMMITTED_TOKENS])
    ds = xr.open_zarr(store, consolidated=False, chunks={} if chunks is None else chunks)
    ds = ds.isel(token=builtins.slice(0, committed))
    ds = ds.set_coords([c for c in COORDS if c in ds])
    ds = ds.assign({name: _decode(ds[name]) for name in ds.data_vars})
    # coordinates are stored in 16x longer chunks than the data (they are tiny); align them so that
    # every per-token block of data meets exactly one block of its labels
    data = ds["resid_final"].variable.data
    token_chunks = data.chunks[0] if isinstance(data, da.Array) else None
    if token_chunks:
        ds = ds.assign_coords({c: ds[c].chunk({"token": token_chunks}) for c in COORDS if c in ds.coords})
    return with_derived_terms(ds)


PER_TOKEN = ("embed", "pos_embed", "token_type_embed", "z", "mlp_out", "neuron_act", "norm_scale",
             "expert_out", "expert_index", "shared_expert_out", "resid_final", "messages", "neuron_out")


def with_token_dim(ds: xr.Dataset) -> tuple[xr.Dataset, bool]:
    """A dataset indexed down to one token (``ds.isel(token=i)``) given its token dim back.

    Returns the dataset and whether the dim was added, so callers can drop it from their result.
    """
    if "token" in ds.dims:
        return ds, False
    per_token = [n for n in (*PER_TOKEN, *COORDS) if n in ds.variables]
    return ds.assign({n: ds[n].expand_dims("token") for n in per_token if n in ds.data_vars}).assign_coords(
        {n: ds[n].expand_dims("token") for n in per_token if n in ds.coords}), True


IDENTITY = ("schema_version", "layout", "model_type", "dtype", "neurons", "weights_fingerprint")


def _open_ranks(paths: list[str], chunks) -> xr.Dataset:
    """One dataset over the rank stores of a data-parallel capture, as one process would have written it."""
    parts, offset = [], 0
    for path in paths:
        ds = open(path, chunks=chunks)
        mismatch = [k for k in IDENTITY if ds.attrs.get(k) != parts[0].attrs.get(k)] if parts else []
        if mismatch:
            raise StreamtapError(f"{path} does not belong with {paths[0]}: its {', '.join(mismatch)} differ")
        parts.append(ds.assign_coords(seq=ds.seq + offset))
        offset += int(ds.attrs["committed_sequences"])
    combined = xr.concat(parts, dim="token", data_vars="minimal", coords="minimal", compat="override",
                         join="override", combine_attrs="override")
    combined.attrs.update(committed_tokens=sum(int(p.attrs["committed_tokens"]) for p in parts),
                          committed_sequences=offset, ranks=len(parts))
    return combined


def _head_messages(z: np.ndarray, W_O: np.ndarray) -> np.ndarray:
    # one block in, one block out: (token chunk, layer, head, d_head) -> (token chunk, layer, head, d_model)
    return np.einsum("...lhd,lhdm->...lhm", z, W_O, optimize=True)


def with_derived_terms(ds: xr.Dataset) -> xr.Dataset:
    """Add ``messages`` = z @ W_O per head and ``neuron_out`` = act * W_out per neuron, lazily."""
    derived = {}
    z = ds["z"].astype(np.float32)
    W_O = ds["W_O"].astype(np.float32)
    if W_O.chunks:  # static weights may be stored in several chunks; each block needs all of W_O
        W_O = W_O.chunk(-1)
    derived["messages"] = xr.apply_ufunc(
        _head_messages, z, W_O,
        input_core_dims=[["layer", "head", "d_head"], ["layer", "head", "d_head", "d_model"]],
        output_core_dims=[["layer", "head", "d_model"]],
        dask="parallelized", output_dtypes=[np.float32],
    )
    if "neuron_act" in ds and "W_out" in ds:
        # one block per (token chunk, layer, neuron slab), sized so no block is bigger than ~64 MB
        step = neuron_slab(ds)
        act = ds["neuron_act"].astype(np.float32).chunk({"layer": 1, "neuron": step})
        W_out = ds["W_out"].astype(np.float32).chunk({"layer": 1, "neuron": step})
        derived["neuron_out"] = (act * W_out).transpose("token", "layer", "neuron", "d_model")
    return ds.assign(derived)


BLOCK_BYTES = 64 << 20


def neuron_slab(ds: xr.Dataset) -> int:
    """Neurons per block of per-neuron outputs, so tokens x neurons x d_model stays bounded."""
    data = ds["neuron_act"].data
    token_chunk = max(data.chunks[0]) if isinstance(data, da.Array) and data.chunks[0] else ds.sizes["token"]
    per_neuron = max(1, token_chunk) * ds.sizes["d_model"] * 4
    return int(max(1, min(ds.sizes["neuron"], BLOCK_BYTES // per_neuron)))
