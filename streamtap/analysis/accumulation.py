"""The residual as an accumulating prediction: PCA of each token's residual across depth.

For one token, stack the residual entering every layer and the final residual (n_layers + 1 points
in d_model), centre them and take their principal components. If the stream accumulates a
prediction, most of the variance lies along one direction (the first component explains most of it)
and that direction, read through the final norm and the unembedding, names the token the model
finally predicts. The first component is oriented to point from the first depth to the last.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._blocks import float_dtype, single_token, static_dask, tokens_map
from ._store import final_norm, require
from ._vocab import vocab_scan
from .decomposition import residual_stream


@single_token
def accumulation_pca(ds: xr.Dataset, *, n_components: int = 3, k: int = 5, sites=("attn",),
                     dtype=np.float32) -> xr.Dataset:
    """PCA over depth of each token's residual, and whether its first component names the prediction.

    For each token the residual entering every layer (and, with ``sites``, between attention and
    MLP) and the final residual are centred and decomposed; the first component is oriented from
    the first depth to the last and read through the final norm's gamma (centred for a LayerNorm)
    and the unembedding. Lazy: one pass over the store's token chunks.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store (``streamtap.open``) or a selection of its tokens; a single token
        (``ds.isel(token=i)``) gives results without the ``token`` dim.
    n_components : int
        How many explained-variance ratios to keep (at most the number of depths).
    k : int
        How many vocabulary tokens PC1 promotes to keep (at most the vocabulary size).
    sites : tuple of str
        ``("attn",)``: the residual entering each layer; ``("attn", "mlp")`` adds the residual
        between each layer's attention and MLP. The final residual is always the last depth.
    dtype : numpy dtype
        A float dtype for the residuals and the unembedding (the PCA itself is in float64).

    Returns
    -------
    xarray.Dataset
        Over ``token`` (with the store's per-token coordinates):

        - ``explained_variance_ratio`` (token, pc), pc = 1..n_components;
        - ``pc1_top_id`` (token, k): the vocabulary ids PC1 promotes most;
        - ``final_top_id`` (token): the model's own top-1 prediction;
        - ``agrees`` (token): PC1's top-1 is the model's top-1;
        - ``final_rank_in_pc1`` (token): rank of the model's top-1 in PC1's projection (0 = first);
        - ``pc1_cos_final`` (token): cosine of PC1 with the final residual.

        Attributes ``depths`` (how many depths were stacked) and ``note``.

    Raises
    ------
    MissingWeightsError
        The store has no unembedding (``W_U``).
    """
    require(ds, "W_U")
    dtype = float_dtype(dtype)
    stack = residual_stream(ds, sites=sites, final=True, dtype=dtype)
    n_depth = stack.sizes["depth"]
    n_components = min(int(n_components), n_depth)
    k = min(int(k), ds.sizes["vocab"])
    statics = {"W_U": static_dask(ds, "W_U", dtype)}
    if "unembed_bias" in ds:
        statics["b_U"] = static_dask(ds, "unembed_bias", dtype)
    width = n_components + k + 4
    data = tokens_map(_block, ("token", "field"), {"field": width}, {"x": stack}, statics, dtype=np.float64,
                      p=final_norm(ds, dtype), n_components=n_components, k=k, dt=dtype)
    nc = n_components
    coords = {c: stack.coords[c] for c in stack.coords if stack.coords[c].dims == ("token",)}
    out = xr.Dataset({
        "explained_variance_ratio": (("token", "pc"), data[:, :nc].astype(dtype)),
        "pc1_top_id": (("token", "k"), data[:, nc:nc + k].astype(np.int64)),
        "final_top_id": (("token",), data[:, nc + k].astype(np.int64)),
        "final_rank_in_pc1": (("token",), data[:, nc + k + 1].astype(np.int64)),
        "pc1_cos_final": (("token",), data[:, nc + k + 2].astype(dtype)),
        "agrees": (("token",), data[:, nc + k + 3] > 0.5),
    }, coords={**coords, "pc": np.arange(1, nc + 1)})
    return out.assign_attrs(depths=int(n_depth), note="PCA over depth of each token's residual (centred)")


def _block(b: dict, *, p, n_components, k, dt) -> np.ndarray:
    """One token chunk: the packed fields of ``accumulation_pca`` (float64, one row per token)."""
    x = b["x"].astype(np.float64)                                    # (T, D, d)
    T = x.shape[0]
    xc = x - x.mean(1, keepdims=True)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    var = s ** 2
    evr = var / np.where(var.sum(-1, keepdims=True) > 0, var.sum(-1, keepdims=True), 1)
    pc1 = vt[:, 0]                                                   # (T, d)
    sign = np.sign(np.einsum("td,td->t", x[:, -1] - x[:, 0], pc1))
    pc1 = pc1 * np.where(sign == 0, 1, sign)[:, None]
    W_U, b_U = b["W_U"], b.get("b_U")
    final = vocab_scan(p.apply(x[:, -1].astype(dt, copy=False)), W_U, b_U, 1, probs=False)["top_id"][:, 0]
    lens = vocab_scan(p.fold(pc1.astype(dt, copy=False)), W_U, None, k, targets=final, probs=False)
    final_vec = x[:, -1]
    cos = np.einsum("td,td->t", pc1, final_vec) / np.maximum(np.linalg.norm(final_vec, axis=-1), 1e-30)
    out = np.empty((T, n_components + k + 4), np.float64)
    out[:, :n_components] = evr[:, :n_components]
    out[:, n_components:n_components + k] = lens["top_id"]
    out[:, n_components + k] = final
    out[:, n_components + k + 1] = lens["target_rank"]
    out[:, n_components + k + 2] = cos
    out[:, n_components + k + 3] = lens["top_id"][:, 0] == final
    return out
