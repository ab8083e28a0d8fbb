"""Reading a store back: an xarray Dataset over the committed tokens, with derived terms lazily.

Only ``committed_tokens`` rows are exposed, whatever capacity the arrays have, so a store that a
crash interrupted opens at its last complete batch. bfloat16 arrays (kept as their uint16 bit
patterns because numpy and zarr 3.1 lack the type) are decoded to float32 lazily, which is exact.
Nothing here imports torch: a store is read with xarray, dask and zarr alone.
"""

from __future__ import annotations

import builtins
import os
import time

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from .errors import StoreAccessError, StreamtapError
from .io.location import access_error, describe, open_group, reaching, resolve
from .io.ranks import rank_stores
from .io.schema import COMMITTED_SEQUENCES, COMMITTED_TOKENS, COORDS, IDENTITY, SCHEMA_VERSION, STORED_DTYPE, per_token_names


def _bits_to_float32(block: np.ndarray) -> np.ndarray:
    x = block.astype(np.uint32)
    x <<= 16  # in place: one temporary fewer than ``(x << 16)``
    return x.view(np.float32)


def _decode(var: xr.DataArray) -> xr.DataArray:
    if var.attrs.get(STORED_DTYPE) == "bfloat16" and var.dtype == np.uint16:
        data = var.data
        if isinstance(data, da.Array):
            data = data.map_blocks(_bits_to_float32, dtype=np.float32)
        else:
            data = _bits_to_float32(np.asarray(data))
        var = var.copy(data=data)
    return var


def open(store, *, chunks: dict | None = None, storage_options: dict | None = None) -> xr.Dataset:  # noqa: A001
    """Open a store as a dask-backed Dataset, with ``head_output`` (and ``neuron_out``) derived lazily.

    Parameters
    ----------
    store : str, os.PathLike or zarr store
        A path, a URL (``s3://bucket/run.zarr``) or a zarr store object; a directory of per-rank
        stores (a data-parallel capture) opens as one.
    chunks : dict, optional
        Passed to ``xarray.open_zarr`` (``{"token": 4096}`` reads bigger blocks).
    storage_options : dict, optional
        For a URL: options of its fsspec filesystem, e.g. ``{"endpoint_url": ...}``.

    Returns
    -------
    xarray.Dataset
        The committed tokens only, every variable lazy. Only Zarr v3 JSON metadata is read, and only
        with zarr's own codecs: nothing from a store is unpickled or executed.
    """
    with reaching(store):
        ds = _open(store, chunks, storage_options)
    if "summary_stores" not in ds.attrs and "summaries" in ds.attrs and isinstance(store, (str, os.PathLike)):
        ds.attrs["summary_stores"] = [os.fspath(store)]   # where streamtap.analysis.summaries reads them
    return ds


def _open(store, chunks, storage_options) -> xr.Dataset:
    ranks = rank_stores(store, storage_options)
    if ranks:
        return _open_ranks(ranks, chunks, storage_options)
    where = describe(store)
    store = resolve(store, storage_options)
    try:
        group = open_group(store, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError,
            NotADirectoryError) as exc:
        raise StreamtapError(f"no streamtap store at {where} ({type(exc).__name__}); give the store's "
                             "top directory, the one that `streamtap capture --out` wrote") from None
    except (ValueError, KeyError, TypeError) as exc:  # zarr.json that is not JSON or not zarr metadata
        raise StoreAccessError(f"the metadata of {where} is damaged ({type(exc).__name__}: {exc}): its top "
                               "zarr.json cannot be read as Zarr v3 group metadata. Restore it from a copy, "
                               "or recapture into a new store") from None
    attrs = dict(group.attrs)
    if COMMITTED_TOKENS not in attrs:
        raise StreamtapError(f"{where} is a Zarr group but not a streamtap store (no {COMMITTED_TOKENS})")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise StreamtapError(
            f"{where} has schema version {attrs.get('schema_version')}, this streamtap reads "
            f"{SCHEMA_VERSION}; install a matching streamtap version"
        )
    committed = int(attrs[COMMITTED_TOKENS])
    try:
        ds = _open_committed(store, group, committed, {} if chunks is None else chunks)
    except Exception as exc:  # a member with a codec or data type zarr does not know (e.g. a pickle codec)
        if access_error(exc) is not None:
            raise
        raise StreamtapError(f"{where} cannot be read: {type(exc).__name__}: {exc}. streamtap reads Zarr v3 "
                             "JSON metadata with zarr's own codecs only, and never unpickles") from exc
    ds = ds.set_coords([c for c in COORDS if c in ds])
    ds = ds.assign({name: _decode(ds[name]) for name in ds.data_vars})
    # coordinates are stored in 16x longer chunks than the data (they are tiny); align them so that
    # every per-token block of data meets exactly one block of its labels
    per_token = [ds[n].variable.data for n in ds.data_vars if ds[n].dims[:1] == ("token",)]
    token_chunks = per_token[0].chunks[0] if per_token and isinstance(per_token[0], da.Array) else None
    if token_chunks:
        ds = ds.assign_coords({c: ds[c].chunk({"token": token_chunks}) for c in COORDS if c in ds.coords})
    return with_derived_terms(_projection_coords(ds))


def _projection_coords(ds: xr.Dataset) -> xr.Dataset:
    """A projecting store's ``component`` and ``direction`` labels (kept in its attributes) as coordinates."""
    if "projection" not in ds or "projection_components" not in ds.attrs:
        return ds
    import json

    from .invariant import component_coords

    labels = [tuple(x) for x in json.loads(ds.attrs["projection_components"])]
    coords = {("component_" + k if k in ("layer", "head", "neuron") else k): v
              for k, v in component_coords(labels).items()}   # layer/head are dims of the store's terms
    coords["direction"] = np.array(json.loads(ds.attrs["projection_directions"]))
    return ds.assign_coords(coords)


def _open_committed(store, group, committed: int, chunks: dict, attempts: int = 50) -> xr.Dataset:
    """The store's arrays cut to ``committed`` rows along ``token``.

    Per-token arrays grow their capacity one after another, so a writer stopped mid-growth (a kill,
    a full disk) leaves arrays of different lengths beyond the committed rows, which xarray refuses
    to put in one Dataset. Such a store is opened as one Dataset per length and merged once cut.
    A writer that is growing them right now can change a length between the listing and the
    opening: then the store is listed again (growth takes milliseconds).
    """
    for _ in range(attempts - 1):
        try:
            return _open_lengths(store, group, committed, chunks)
        except ValueError as exc:
            if "conflicting sizes" not in str(exc):
                raise
            time.sleep(0.02)
    return _open_lengths(store, group, committed, chunks)


def _open_lengths(store, group, committed: int, chunks: dict) -> xr.Dataset:
    arrays = list(group.arrays())  # one listing (a round trip on object storage)
    lengths: dict[int, list[str]] = {}
    short = {}  # arrays that end before the committed tokens do: damaged, left out and reported
    for name, array in arrays:
        dims = array.metadata.dimension_names or ()
        if dims and dims[0] == "token":
            if array.shape[0] < committed:
                short[name] = f"holds {array.shape[0]:,} tokens, {committed:,} are committed"
            else:
                lengths.setdefault(array.shape[0], []).append(name)

    def opened(drop):
        ds = xr.open_zarr(store, consolidated=False, zarr_format=3, chunks=chunks, drop_variables=drop)
        return ds.isel(token=builtins.slice(0, committed)) if "token" in ds.dims else ds

    if len(lengths) <= 1:
        ds = opened(list(short) or None)
    else:
        per_token = [n for names in lengths.values() for n in names]
        static = [name for name, _ in arrays if name not in per_token and name not in short]
        parts = [opened([n for n in per_token if n not in names] + list(short) + (static if i else []))
                 for i, names in enumerate(lengths.values())]
        ds = xr.merge(parts, compat="override", join="override", combine_attrs="override")
    if short:
        ds.attrs["unreadable"] = short
    return ds


def with_token_dim(ds: xr.Dataset) -> tuple[xr.Dataset, bool]:
    """A dataset indexed down to one token (``ds.isel(token=i)``) given its token dim back.

    Returns the dataset and whether the dim was added, so callers can drop it from their result.
    """
    if "token" in ds.dims:
        return ds, False
    per_token = [n for n in (*per_token_names(), *COORDS) if n in ds.variables]
    return ds.assign({n: ds[n].expand_dims("token") for n in per_token if n in ds.data_vars}).assign_coords(
        {n: ds[n].expand_dims("token") for n in per_token if n in ds.coords}), True


def _open_ranks(paths: list[str], chunks, storage_options: dict | None = None) -> xr.Dataset:
    """One dataset over the rank stores of a data-parallel capture, as one process would have written it."""
    parts, offset = [], 0
    for path in paths:
        ds = open(path, chunks=chunks, storage_options=storage_options)
        mismatch = [k for k in IDENTITY if ds.attrs.get(k) != parts[0].attrs.get(k)] if parts else []
        if mismatch:
            raise StreamtapError(f"{path} does not belong with {paths[0]}: its {', '.join(mismatch)} differ")
        parts.append(ds.assign_coords(seq=ds.seq + offset))
        offset += int(ds.attrs[COMMITTED_SEQUENCES])
    combined = xr.concat(parts, dim="token", data_vars="minimal", coords="minimal", compat="override",
                         join="override", combine_attrs="override")
    combined.attrs.update({COMMITTED_TOKENS: sum(int(p.attrs[COMMITTED_TOKENS]) for p in parts),
                           COMMITTED_SEQUENCES: offset, "ranks": len(parts)})
    if any("summaries" in p.attrs for p in parts):   # merged by streamtap.analysis.summaries, ranks in order
        combined.attrs["summary_stores"] = [os.fspath(p) for p in paths]
    return combined


def _head_outputs(z: np.ndarray, W_O: np.ndarray) -> np.ndarray:
    # one block in, one block out: (token chunk, layer, head, d_head) -> (token chunk, layer, head, d_model)
    return np.einsum("...lhd,lhdm->...lhm", z, W_O, optimize=True)


def with_derived_terms(ds: xr.Dataset) -> xr.Dataset:
    """Add ``head_output`` = z @ W_O per head and ``neuron_out`` = act * W_out per neuron, lazily.

    A store that lacks what a derived term is made of (a damaged store) opens without it;
    ``streamtap.verify`` names what is missing.
    """
    derived = {}
    if "z" not in ds or "W_O" not in ds:
        return ds
    z = ds["z"].astype(np.float32)
    W_O = ds["W_O"].astype(np.float32)
    if W_O.chunks:  # static weights may be stored in several chunks; each block needs all of W_O
        W_O = W_O.chunk(-1)
    derived["head_output"] = xr.apply_ufunc(
        _head_outputs, z, W_O,
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
