"""Empty messages: heads that, at a token, write almost nothing into the residual stream.

Attention must put its weight somewhere; a head with nothing to say at a token attends where the
values it mixes are small or cancel, and its message is near-empty. Per head and token this measures
the message norm, the norm relative to the residual the head reads (the residual entering its
layer), and the message's cosine with the mean embedding direction of the corpus's most and least
frequent tokens (near-empty messages tend to align with frequent-token directions, which the final
norm and unembedding largely ignore). Everything comes from the stored z through small per-head
matrices (W_O W_O^T and W_O u), without materialising a single message.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from ._blocks import as_static_dask, float_dtype, pack, per_token, single_token, token_coords, tokens_map, unpack
from ._store import embedding_matrix, local, static
from .decomposition import residual_stream

FIELDS = ["norm", "relative_norm", "cos_frequent", "cos_rare"]


def token_frequencies(ds: xr.Dataset) -> xr.DataArray:
    """How often each vocabulary id occurs among the stored tokens, computed.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store or a selection of its tokens.

    Returns
    -------
    xarray.DataArray
        ``count`` over ``vocab``: the store's vocabulary size where it has a ``vocab`` dim, else
        the largest stored id + 1.
    """
    ids = ds["token_id"].data
    ids = ids if isinstance(ids, da.Array) else da.from_array(np.asarray(ids))
    n_vocab = ds.sizes["vocab"] if "vocab" in ds.dims else int(ids.max().compute()) + 1
    counts = da.bincount(ids.astype(np.int64), minlength=n_vocab).compute()[:n_vocab]
    return xr.DataArray(counts, dims=("vocab",), name="count")


def frequency_extremes(ds: xr.Dataset, n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The most and the least frequent vocabulary ids among the stored tokens.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store or a selection of its tokens.
    n : int
        How many ids of each kind.

    Returns
    -------
    most, rare : numpy.ndarray
        Ids of the ``n`` most frequent stored tokens (count descending), and of the ``n`` least
        frequent among those that occur (count ascending); ties go to the smaller id.
    """
    counts = token_frequencies(ds).values
    seen = np.flatnonzero(counts)
    order = np.lexsort((seen, -counts[seen]))          # count descending, then id
    most = seen[order[:n]]
    order = np.lexsort((seen, counts[seen]))           # count ascending, then id
    rare = seen[order[:n]]
    return most, rare


@single_token
def empty_messages(ds: xr.Dataset, *, n_tokens: int = 10, frequency_from: xr.Dataset | None = None,
                   dtype=np.float32) -> xr.Dataset:
    """Norm and direction of every head's message at every token, lazily.

    Computed from the stored ``z`` through small per-head matrices (W_O W_O^T and W_O u), so no
    message is materialised. The token frequencies behind the two directions are counted at once
    (one pass over ``token_id``); the rest is one lazy pass over the store's token chunks.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store or a selection of its tokens; a single token gives results without the
        ``token`` dim.
    n_tokens : int
        How many of the most and least frequent tokens define the two directions.
    frequency_from : xarray.Dataset, optional
        Where to count token frequencies (default: ``ds`` itself).
    dtype : numpy dtype
        A float dtype the norms are computed in.

    Returns
    -------
    xarray.Dataset
        Over (token, layer, head): ``norm`` (|message|), ``relative_norm`` (|message| / |residual
        entering the layer|), ``cos_frequent`` and ``cos_rare`` (cosine with the mean unit
        embedding of the ``n_tokens`` most, resp. least, frequent tokens; 0 for a zero message).
        Attributes ``frequent_ids``, ``rare_ids`` and ``note``.

    Raises
    ------
    MissingWeightsError
        The store has no token embedding (``W_E``, or ``W_U`` standing for it).
    """
    dtype = float_dtype(dtype)
    most, rare = frequency_extremes(frequency_from if frequency_from is not None else ds, n_tokens)
    E = np.asarray(local(embedding_matrix(ds)).values, np.float64)
    unit = E / np.maximum(np.linalg.norm(E, axis=-1, keepdims=True), 1e-30)
    directions = []
    for ids in (most, rare):
        v = unit[ids].mean(0)
        directions.append(v / max(np.linalg.norm(v), 1e-30))
    W_O = static(ds, "W_O", np.float64)
    gram = np.einsum("lhem,lhfm->lhef", W_O, W_O)
    proj = np.stack([np.einsum("lhem,m->lhe", W_O, v) for v in directions], axis=-1)   # (L, H, e, 2)
    stream = residual_stream(ds, final=False, dtype=dtype)
    inputs = {"z": per_token(ds, "z"), "x": stream}
    statics = {"gram": as_static_dask(gram.astype(dtype), ("layer", "head", "d_head", "d_head2")),
               "proj": as_static_dask(proj.astype(dtype), ("layer", "head", "d_head", "two"))}
    data = tokens_map(_block, ("token", "layer", "head", "field"),
                      {"layer": ds.sizes["layer"], "head": ds.sizes["head"], "field": len(FIELDS)},
                      inputs, statics, dtype=np.float64, dt=dtype)
    fields = unpack(data, FIELDS)
    dims = ("token", "layer", "head")
    coords = {**token_coords(ds), "layer": np.arange(ds.sizes["layer"]), "head": np.arange(ds.sizes["head"])}
    return xr.Dataset({n: xr.DataArray(v.astype(dtype), dims=dims) for n, v in fields.items()}, coords=coords,
                      attrs={"frequent_ids": most.tolist(), "rare_ids": rare.tolist(),
                             "note": "relative_norm = |message| / |residual entering the layer|"})


def _block(b: dict, *, dt) -> np.ndarray:
    """One token chunk: the packed fields (token, layer, head, field) of ``empty_messages``."""
    z = b["z"].astype(dt, copy=False)
    sq = np.einsum("tlhe,lhef,tlhf->tlh", z, b["gram"], z, optimize=True)
    norm = np.sqrt(np.clip(sq, 0, None))
    resid = np.linalg.norm(b["x"].astype(dt, copy=False), axis=-1)                 # (T, L)
    dots = np.einsum("tlhe,lhef->tlhf", z, b["proj"])                  # (T, L, H, 2); directions are unit
    safe = np.where(norm > 0, norm, 1)[..., None]
    cos = np.where(norm[..., None] > 0, dots / safe, 0)
    rel = norm / np.where(resid > 0, resid, 1)[:, :, None]
    return pack({"norm": norm, "relative_norm": rel, "cos_frequent": cos[..., 0], "cos_rare": cos[..., 1]}, FIELDS)


NEAR_EMPTY = 0.02   # near-empty: |message| below 2% of the residual entering its layer


def empty_message_summary(em: xr.Dataset, *, threshold: float = NEAR_EMPTY, mostly: float = 0.5) -> xr.Dataset:
    """Per head: how often its message is near-empty (relative_norm < threshold), computed.

    Reduces an ``empty_messages`` result over its tokens in one pass.

    Parameters
    ----------
    em : xarray.Dataset
        An ``empty_messages`` result (lazy or computed).
    threshold : float
        A message is near-empty when its ``relative_norm`` is below this.
    mostly : float
        The share of near-empty tokens from which a head counts as ``mostly_empty``.

    Returns
    -------
    xarray.Dataset
        Over (layer, head): ``fraction_empty``, ``mean_norm``, ``mean_relative_norm``,
        ``cos_frequent_empty``/``cos_rare_empty`` (mean cosines over the near-empty messages; NaN
        for a head with none), ``cos_frequent_all`` (mean over all tokens) and ``mostly_empty``
        (fraction_empty >= ``mostly``). Attributes ``threshold``, ``mostly``, ``n_tokens`` and
        those of ``em``.
    """
    empty = em["relative_norm"] < threshold
    out = xr.Dataset({
        "fraction_empty": empty.mean("token"),
        "mean_norm": em["norm"].mean("token"),
        "mean_relative_norm": em["relative_norm"].mean("token"),
        "cos_frequent_empty": em["cos_frequent"].where(empty).mean("token"),
        "cos_rare_empty": em["cos_rare"].where(empty).mean("token"),
        "cos_frequent_all": em["cos_frequent"].mean("token"),
    })
    out = out.drop_vars([c for c in out.coords if c not in ("layer", "head")]).compute()
    out["mostly_empty"] = out["fraction_empty"] >= mostly
    return out.assign_attrs(threshold=threshold, mostly=mostly, n_tokens=int(em.sizes["token"]), **em.attrs)
