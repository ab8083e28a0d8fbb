"""What a head says: each head's output projected to the vocabulary.

A head's output m (one head, one token) changes the logits directly by s (gamma * (m' - mean m')) @ W_U^T,
with s the token's frozen final-norm scale and m' the output as it reaches the final norm (carried
through any norm the stream applies after it, ``streamtap.stream.carry``; m' = m where none does):
its direct logit attribution over the whole vocabulary. The tokens it pushes up most are what the head
"says" at that token; the ones it pushes down most, what it argues against. W_U is the stored
unembedding, the tied embedding for tied models.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..invariant import stream_events
from ..stream import Write, block_norms, carry
from ._blocks import float_dtype, norm_center, pack, per_token, single_token, static_dask, tokens_map, unpack
from ._store import final_norm, require
from ._vocab import vocab_scan

FIELDS = ["top_id", "top_logit", "bottom_id", "bottom_logit"]


@single_token
def head_vocab(ds: xr.Dataset, *, k: int = 10, layers=None, through_norm: bool = True,
               dtype=np.float32) -> xr.Dataset:
    """Top and bottom vocabulary tokens of every head's output: Dataset (token, layer, head, k), lazy.

    Each head's output is read as its direct logit attribution over the whole vocabulary (see the
    module docstring). Every output costs a vocabulary-sized product, so on big stores select
    tokens with ``ds.isel(token=...)`` and layers with ``layers`` first.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store or a selection of its tokens; a single token gives results without the
        ``token`` dim.
    k : int
        How many tokens to keep at each end (at most the vocabulary size).
    layers : int or sequence of int, optional
        The layers to compute (default: all).
    through_norm : bool
        Read each output through the final norm with the token's frozen scale (its direct effect
        on the logits); ``False`` multiplies the output, as it reaches the final norm, by W_U
        without the norm.
    dtype : numpy dtype
        A float dtype the products are computed in.

    Returns
    -------
    xarray.Dataset
        Over (token, layer, head, k): ``top_id``/``top_logit``, the k tokens whose logits the output
        raises most, largest first; ``bottom_id``/``bottom_logit``, the k it lowers most. The
        unembedding bias is not included (it is no head's effect). Attributes ``k``,
        ``through_norm`` and ``note``.

    Raises
    ------
    MissingWeightsError
        The store has no unembedding (``W_U``).
    """
    require(ds, "W_U")
    dtype = float_dtype(dtype)
    layer_ids = np.arange(ds.sizes["layer"]) if layers is None else np.atleast_1d(np.asarray(layers, int))
    k = min(int(k), ds.sizes["vocab"])
    n_heads = ds.sizes["head"]
    events = stream_events(ds)
    writes = {e.layer: i for i, e in enumerate(events) if isinstance(e, Write) and e.site == "attn"}
    inputs = {n: per_token(ds, n) for n in ("z", "resid_final") + (("norm_scale",) if "norm_weight" in ds else ())}
    statics = {n: static_dask(ds, n, dtype) for n in ("W_U", "W_O", "norm_weight", "norm_bias") if n in ds}
    data = tokens_map(_block, ("token", "sel", "head", "k", "field"),
                      {"sel": len(layer_ids), "head": n_heads, "k": k, "field": len(FIELDS)}, inputs, statics,
                      dtype=np.float64, p=final_norm(ds, dtype), k=k, through_norm=through_norm, dt=dtype,
                      events=events, center=norm_center(ds), layers=[int(l) for l in layer_ids],
                      index=[writes[int(l)] for l in layer_ids])
    fields = unpack(data, FIELDS, int_fields=("top_id", "bottom_id"))
    dims = ("token", "layer", "head", "k")
    coords = {name: c.drop_encoding() for name, c in ds.coords.items() if c.dims == ("token",)}
    coords.update(layer=layer_ids, head=np.arange(n_heads))
    return xr.Dataset({n: xr.DataArray(v if n.endswith("_id") else v.astype(dtype), dims=dims)
                       for n, v in fields.items()}, coords=coords).assign_attrs(
        k=k, through_norm=int(through_norm),
        note="logit change each head's output causes directly" + (" (through the final norm, frozen scale)"
                                                                  if through_norm else " (raw output @ W_U^T)"))


def _block(b: dict, *, p, k, through_norm, dt, events, center, layers, index) -> np.ndarray:
    """One token chunk: the packed fields (token, layer, head, k, field) of ``head_vocab``."""
    s = p.scale(b["resid_final"].astype(dt, copy=False))
    z, W_O = b["z"].astype(dt, copy=False), b["W_O"]
    T, H = z.shape[0], z.shape[2]
    norms = block_norms(b, center)
    out = np.empty((T, len(layers), H, k, len(FIELDS)), np.float64)
    for j, (layer, i) in enumerate(zip(layers, index)):
        m = np.einsum("the,hem->htm", z[:, layer], W_O[layer])          # (head, token, d_model)
        m = carry(events, norms, i, m).transpose(1, 0, 2)               # as it reaches the final norm
        if through_norm:
            if p.center:
                m = m - m.mean(-1, keepdims=True)
            m = m * p.gamma * s[:, None, None]
        res = vocab_scan(m.reshape(T * H, -1), b["W_U"], None, k, bottom=True, probs=False)
        out[:, j] = pack(res, FIELDS).reshape(T, H, k, len(FIELDS))
    return out
