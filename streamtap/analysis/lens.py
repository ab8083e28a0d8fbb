"""Logit lens: the accumulated residual read out through the final norm and the unembedding, layer by layer.

At every depth (the residual entering each layer, optionally also between attention and MLP, and the
final residual) the residual is normalised by the final norm with its own scale (as the model would
if it stopped there) and unembedded. At ``final`` this is the model's own output distribution.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._blocks import float_dtype, pack, single_token, static_dask, tokens_map, unpack
from ._store import final_norm, logit_softcap, require
from ._vocab import vocab_scan
from ._vocab import target_ids
from .decomposition import residual_stream

FIELDS = ["top_id", "top_logit", "top_prob"]
TARGET_FIELDS = ["target_logit", "target_prob", "target_rank"]


@single_token
def logit_lens(ds: xr.Dataset, *, k: int = 10, sites=("attn",), final: bool = True, target=None,
               dtype=np.float32) -> xr.Dataset:
    """Top-k tokens of the residual at every depth: Dataset (token, depth, k), lazy.

    Each depth's residual goes through the final norm with its own scale, the unembedding (and its
    bias) and the model's logit soft-capping where it has one, as the model would if it stopped
    there; at ``final`` this is the model's own output distribution.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store or a selection of its tokens; a single token gives results without the
        ``token`` dim.
    k : int
        How many top tokens to keep (at most the vocabulary size).
    sites : tuple of str
        ``("attn",)``: the residual entering every layer; ``("attn", "mlp")`` adds the residual
        between each layer's attention and MLP; ``()`` none.
    final : bool
        End with the final residual.
    target : int, str or array, optional
        A vocabulary id, a token string the store can resolve, or one id per stored token, to
        follow through the depths.
    dtype : numpy dtype
        A float dtype the logits are computed in.

    Returns
    -------
    xarray.Dataset
        ``top_id``, ``top_logit``, ``top_prob`` (softmax over the whole vocabulary) over (token,
        depth, k), and with ``target`` ``target_logit``, ``target_prob``, ``target_rank`` (0 = top)
        over (token, depth). ``depth`` labels read ``L3_attn_in`` ... ``final``; texts of ids come
        from ``streamtap.analysis.vocab_text``. Attributes ``k``, ``target`` and ``note``.

    Raises
    ------
    MissingWeightsError
        The store has no unembedding (``W_U``).
    StreamtapError
        A per-token ``target`` of the wrong length, or a token string that does not resolve.
    """
    require(ds, "W_U")
    dtype = float_dtype(dtype)
    stack = residual_stream(ds, sites=sites, final=final, dtype=dtype)
    n_tok, n_depth = ds.sizes["token"], stack.sizes["depth"]
    k = min(int(k), ds.sizes["vocab"])
    tgt, per_tok = target_ids(ds, target, n_tok, "target")
    inputs = {"x": stack}
    if per_tok:
        inputs["target"] = xr.DataArray(_chunked(tgt, stack), dims=("token",))
    statics = {"W_U": static_dask(ds, "W_U", dtype)}
    if "unembed_bias" in ds:
        statics["b_U"] = static_dask(ds, "unembed_bias", dtype)
    data = tokens_map(_lens_block, ("token", "depth", "slot", "field"),
                      {"depth": n_depth, "slot": k + 1, "field": 3}, inputs, statics, dtype=np.float64,
                      p=final_norm(ds, dtype), k=k, target=None if per_tok else tgt, dt=dtype,
                      softcap=logit_softcap(ds))
    top = unpack(data[:, :, :k], FIELDS, int_fields=("top_id",))
    coords = dict(stack.coords)
    dims = ("token", "depth", "k")
    out = xr.Dataset({n: xr.DataArray(v.astype(np.int64) if n == "top_id" else v.astype(dtype), dims=dims)
                      for n, v in top.items()}, coords=coords)
    if tgt is not None:
        t = unpack(data[:, :, k], TARGET_FIELDS, int_fields=("target_rank",))
        out = out.assign({n: xr.DataArray(v if n == "target_rank" else v.astype(dtype), dims=("token", "depth"))
                          for n, v in t.items()})
    cap = logit_softcap(ds)
    return out.assign_attrs(k=k, target=str(tgt) if not per_tok else "per token",
                            note="residual at each depth through the final norm (own scale) and W_U"
                                 + (f", logits soft-capped at {cap:g} as the model does" if cap else ""))


def _chunked(ids: np.ndarray, like: xr.DataArray):
    """Per-token ids as a dask array chunked along token like ``like``."""
    import dask.array as da

    return da.from_array(np.asarray(ids, np.int64), chunks=(like.chunks[0],))


def _lens_block(b: dict, *, p, k, target, dt, softcap) -> np.ndarray:
    """One token chunk: (token, depth, k + 1, 3), the top-k fields and, in the last slot, the target's."""
    x = b["x"].astype(dt, copy=False)
    T, D, d = x.shape
    rows = p.apply(x).reshape(T * D, d)
    if "target" in b:
        targets = np.repeat(b["target"], D)
    elif target is not None:
        targets = np.full(T * D, int(target))
    else:
        targets = None
    res = vocab_scan(rows, b["W_U"], b.get("b_U"), k, targets=targets, softcap=softcap)
    out = np.zeros((T, D, k + 1, 3), np.float64)
    out[:, :, :k] = pack(res, FIELDS).reshape(T, D, k, 3)
    if targets is not None:
        out[:, :, k] = pack(res, TARGET_FIELDS).reshape(T, D, 3)
    return out
