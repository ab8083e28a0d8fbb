"""What a head says: each message projected to the vocabulary.

A message m (one head, one token) changes the logits directly by s (gamma * (m - mean m)) @ W_U^T, with
s the token's frozen final-norm scale (where the stream normalises terms after they are written, as
in post-LN models, m is the message as it reaches the final norm, from ``decompose``): its direct logit attribution over the whole vocabulary (summed
over every component and the biases, that is the model's logits). The tokens it pushes up most are
what the head "says" at that token; the ones it pushes down most, what it argues against. W_U is the
stored unembedding, the tied embedding for tied models.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._common import (float_dtype, norm_params, norm_scale_np, pack, per_token, prenorm_exact, require,
                      single_token, static_dask, token_coords, tokens_map, unpack, vocab_scan)

FIELDS = ["top_id", "top_logit", "bottom_id", "bottom_logit"]


@single_token
def head_vocab(ds: xr.Dataset, *, k: int = 10, layers=None, through_norm: bool = True,
               dtype=np.float32) -> xr.Dataset:
    """Top and bottom vocabulary tokens of every message: Dataset (token, layer, head, k), lazy.

    ``top_id``/``top_logit`` are the k tokens whose logits the message raises most (its direct
    effect through the final norm with the token's frozen scale), ``bottom_id``/``bottom_logit``
    the k it lowers most. ``through_norm=False`` projects the raw message onto W_U instead.
    ``layers`` limits the work to some layers (every message costs a vocabulary-sized product, so
    select tokens with ``ds.isel(token=...)`` first on big stores).
    """
    require(ds, "W_U")
    dtype = float_dtype(dtype)
    layer_ids = np.arange(ds.sizes["layer"]) if layers is None else np.atleast_1d(np.asarray(layers, int))
    sub = ds.isel(layer=layer_ids)
    k = min(int(k), ds.sizes["vocab"])
    n_layers, n_heads = len(layer_ids), ds.sizes["head"]
    inputs = {"resid_final": per_token(sub, "resid_final")}
    statics = {"W_U": static_dask(sub, "W_U", dtype)}
    if prenorm_exact(ds):
        inputs["z"] = per_token(sub, "z")
        statics["W_O"] = static_dask(sub, "W_O", dtype)
    else:  # messages as they reach the final norm (through any norm the stream applies after them)
        from ..invariant import decompose

        terms = decompose(ds, dtype=dtype)
        labels = [f"L{l}H{h}" for l in layer_ids for h in range(n_heads)]
        heads = terms.sel(component=labels).data.reshape(n_layers, n_heads, *terms.shape[1:])
        heads = heads.transpose(2, 0, 1, 3).rechunk({0: inputs["resid_final"].chunks[0], 1: -1, 2: -1, 3: -1})
        inputs["messages"] = xr.DataArray(heads, dims=("token", "layer", "head", "d_model"))
    data = tokens_map(_block, ("token", "layer", "head", "k", "field"),
                      {"layer": n_layers, "head": n_heads, "k": k, "field": len(FIELDS)}, inputs, statics,
                      dtype=np.float64, p=norm_params(ds, dtype), k=k, through_norm=through_norm, dt=dtype)
    fields = unpack(data, FIELDS, int_fields=("top_id", "bottom_id"))
    dims = ("token", "layer", "head", "k")
    coords = {**token_coords(ds), "layer": layer_ids, "head": np.arange(n_heads)}
    return xr.Dataset({n: xr.DataArray(v if n.endswith("_id") else v.astype(dtype), dims=dims)
                       for n, v in fields.items()}, coords=coords).assign_attrs(
        k=k, through_norm=int(through_norm),
        note="logit change each message causes directly" + (" (through the final norm, frozen scale)"
                                                            if through_norm else " (raw message @ W_U^T)"))


def _block(b: dict, *, p, k, through_norm, dt) -> np.ndarray:
    s = norm_scale_np(b["resid_final"].astype(dt, copy=False), p["center"], p["eps"])
    if "messages" in b:
        msgs = b["messages"].astype(dt, copy=False)
        T, L, H, _ = msgs.shape
    else:
        z, W_O = b["z"].astype(dt, copy=False), b["W_O"]
        T, L, H, _ = z.shape
    out = np.empty((T, L, H, k, len(FIELDS)), np.float64)
    for layer in range(L):
        m = msgs[:, layer] if "messages" in b else np.einsum("the,hem->thm", z[:, layer], W_O[layer])
        if through_norm:
            if p["center"]:
                m = m - m.mean(-1, keepdims=True)
            m = m * p["gamma"] * s[:, None, None]
        res = vocab_scan(m.reshape(T * H, -1), b["W_U"], None, k, bottom=True, probs=False)
        out[:, layer] = pack(res, FIELDS).reshape(T, H, k, len(FIELDS))
    return out
