"""Fuse and rank-reduce: effective ranks of W_QK and W_OV against their factors, and truncation errors.

A fused d_model x d_model matrix of one head has rank at most d_head, and its singular values come
from small matrices: with W_Q = Q1 R1 and W_K = Q2 R2 (thin QR), W_Q W_K^T = Q1 (R1 R2^T) Q2^T, so
they are those of the d_head x d_head matrix R1 R2^T (likewise W_OV with W_V and W_O^T). Exact, and
cheap enough for every head of every layer.

Effective rank, two definitions (over the singular values s):
    entropy   exp(H(p)), p = s / sum(s)        (Roy & Vetterli 2007): 1 for rank one, r for r equal values
    energy    the smallest r with sum_{i<=r} s_i^2 >= 99% of sum s^2
Truncation to rank r (Eckart-Young) leaves a relative Frobenius error sqrt(sum_{i>r} s_i^2 / sum s^2).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._common import per_query_head, require, static

MATRICES = ("W_Q", "W_K", "W_QK", "W_V", "W_O", "W_OV")


def singular_values(ds: xr.Dataset, *, dtype=np.float64) -> xr.DataArray:
    """Singular values of each head's factors and fused matrices: (layer, head, matrix, index)."""
    require(ds, "W_Q", "W_K", "W_V")
    W_Q = static(ds, "W_Q", dtype)
    W_K = per_query_head(ds, "W_K", dtype)
    W_V = per_query_head(ds, "W_V", dtype)
    W_O = static(ds, "W_O", dtype)                                  # (L, H, e, d)
    sv = lambda a: np.linalg.svd(a, compute_uv=False)               # noqa: E731
    R = lambda a: np.linalg.qr(a, mode="r")                         # noqa: E731 - (..., e, e)
    R_O = R(np.swapaxes(W_O, -1, -2))
    vals = [sv(W_Q), sv(W_K), sv(R(W_Q) @ np.swapaxes(R(W_K), -1, -2)),
            sv(W_V), sv(W_O), sv(R(W_V) @ np.swapaxes(R_O, -1, -2))]
    data = np.stack(vals, axis=2)                                   # (L, H, 6, e)
    return xr.DataArray(data, dims=("layer", "head", "matrix", "index"),
                        coords={"layer": np.arange(data.shape[0]), "head": np.arange(data.shape[1]),
                                "matrix": list(MATRICES)}, name="singular_value")


def effective_rank(ds: xr.Dataset, *, energy: float = 0.99, dtype=np.float64) -> xr.Dataset:
    """Effective ranks and rank-r truncation errors of W_Q, W_K, W_QK, W_V, W_O, W_OV per head.

    Dataset with ``erank_entropy`` and ``erank_energy`` (layer, head, matrix), ``singular_value``
    (layer, head, matrix, index) and ``truncation_error`` (layer, head, matrix, rank), rank 1..d_head:
    the relative Frobenius error of the best rank-r approximation.
    """
    s = singular_values(ds, dtype=dtype)
    v = s.values
    total = v.sum(-1, keepdims=True)
    p = np.where(total > 0, v / np.where(total > 0, total, 1), 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0).sum(-1)
    sq = v ** 2
    cum = np.cumsum(sq, -1) / np.where(sq.sum(-1, keepdims=True) > 0, sq.sum(-1, keepdims=True), 1)
    e_rank = (cum < energy - 1e-12).sum(-1) + 1
    trunc = np.sqrt(np.clip(1 - cum, 0, None))
    dims = ("layer", "head", "matrix")
    return xr.Dataset(
        {"erank_entropy": (dims, np.exp(ent)), "erank_energy": (dims, e_rank.astype(np.int64)),
         "singular_value": s, "truncation_error": (dims + ("rank",), trunc)},
        coords={**s.coords, "rank": np.arange(1, v.shape[-1] + 1)},
        attrs={"energy": energy, "note": "fused W_QK = W_Q W_K^T, W_OV = W_V W_O (d_model x d_model, rank <= d_head)"})
