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
    try:
        group = open_group(store, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise StreamtapError(f"no streamtap store at {store!r}: {exc}") from None
    attrs = dict(group.attrs)
    if COMMITTED_TOKENS not in attrs:
        raise StreamtapError(f"{store!r} is a Zarr group but not a streamtap store (no {COMMITTED_TOKENS})")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StreamtapError(
            f"{store!r} has schema version {attrs.get('schema_version')}, this streamtap reads "
            f"{SCHEMA_VERSION}; install a matching streamtap version"
        )
    committed = int(attrs[COMMITTED_TOKENS])
    ds = xr.open_zarr(store, consolidated=False, chunks={} if chunks is None else chunks)
    ds = ds.isel(token=builtins.slice(0, committed))
    ds = ds.set_coords([c for c in COORDS if c in ds])
    ds = ds.assign({name: _decode(ds[name]) for name in ds.data_vars})
    ds = ds.assign_coords({name: _decode(ds[name]) for name in ds.coords if name in ds.data_vars})
    return with_derived_terms(ds)


def with_derived_terms(ds: xr.Dataset) -> xr.Dataset:
    """Add ``messages`` = z @ W_O per head and ``neuron_out`` = act * W_out per neuron, lazily."""
    derived = {}
    z = ds["z"].astype(np.float32)
    W_O = ds["W_O"].astype(np.float32)
    derived["messages"] = xr.dot(z, W_O, dim="d_head").transpose("token", "layer", "head", "d_model")
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
    token_chunk = max(ds["neuron_act"].chunksizes.get("token", (1,))) if ds["neuron_act"].chunks else ds.sizes["token"]
    per_neuron = max(1, token_chunk) * ds.sizes["d_model"] * 4
    return int(max(1, min(ds.sizes["neuron"], BLOCK_BYTES // per_neuron)))
