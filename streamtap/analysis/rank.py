"""Fuse and rank-reduce: effective ranks of W_QK and W_OV against their factors, and truncation errors.

A fused d_model x d_model matrix of one head has rank at most d_head, and its singular values come
from small matrices: the squared singular values of W_Q W_K^T are the eigenvalues of
(W_Q^T W_Q)(W_K^T W_K), a d_head x d_head product (likewise W_OV = W_V W_O with W_V^T W_V and
W_O W_O^T). Cheap enough for every head of every layer.

Effective rank, two definitions (over the singular values s):
    entropy   exp(H(p)), p = s / sum(s)        (Roy & Vetterli 2007): 1 for rank one, r for r equal values
    energy    the smallest r with sum_{i<=r} s_i^2 >= 99% of sum s^2
Truncation to rank r (Eckart-Young) leaves a relative Frobenius error sqrt(sum_{i>r} s_i^2 / sum s^2).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._store import per_query_head, require, static

MATRICES = ("W_Q", "W_K", "W_QK", "W_V", "W_O", "W_OV")


def _sv_from_gram(g: np.ndarray) -> np.ndarray:
    """Singular values from a (batched) Gram matrix A^T A or A A^T, descending."""
    lam = np.clip(np.linalg.eigvalsh(g), 0, None)
    return np.sqrt(lam[..., ::-1])


def _sqrt_psd(g: np.ndarray) -> np.ndarray:
    """The symmetric square root of a (batched) positive semi-definite matrix, negative eigenvalues clipped."""
    lam, vec = np.linalg.eigh(g)
    return (vec * np.sqrt(np.clip(lam, 0, None))[..., None, :]) @ np.swapaxes(vec, -1, -2)


def _sv_of_product(g_left: np.ndarray, g_right: np.ndarray) -> np.ndarray:
    """Singular values of A B^T from G_A = A^T A and G_B = B^T B (all d_head x d_head).

    (A B^T)^T (A B^T) = B G_A B^T has the non-zero eigenvalues of G_A G_B, which are those of the
    symmetric G_A^(1/2) G_B G_A^(1/2).
    """
    root = _sqrt_psd(g_left)
    return _sv_from_gram(root @ g_right @ root)


def singular_values(ds: xr.Dataset, *, dtype=np.float64) -> xr.DataArray:
    """Singular values of each head's factors and fused matrices, computed.

    Everything goes through d_head x d_head Gram matrices (batched symmetric eigenproblems): in
    float64 this is accurate to well below what effective ranks need, and it avoids stacked SVDs of
    tall d_model x d_head matrices, each problem too small for a threaded BLAS to split well.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store.
    dtype : numpy dtype
        What the Gram matrices and eigenproblems are computed in.

    Returns
    -------
    xarray.DataArray
        ``singular_value`` (layer, head, matrix, index), descending along ``index`` (d_head values);
        ``matrix`` is one of W_Q, W_K, W_QK, W_V, W_O, W_OV.

    Raises
    ------
    MissingWeightsError
        The store has no ``W_Q``, ``W_K`` or ``W_V``.
    """
    require(ds, "W_Q", "W_K", "W_V")
    W_Q = static(ds, "W_Q", dtype)                                  # (L, H, d, e)
    W_K = per_query_head(ds, "W_K", dtype)
    W_V = per_query_head(ds, "W_V", dtype)
    W_O = static(ds, "W_O", dtype)                                  # (L, H, e, d)
    T = lambda a: np.swapaxes(a, -1, -2)                            # noqa: E731
    G_Q, G_K, G_V = T(W_Q) @ W_Q, T(W_K) @ W_K, T(W_V) @ W_V        # (L, H, e, e)
    H_O = W_O @ T(W_O)                                              # W_O W_O^T: Gram of W_O^T
    vals = [_sv_from_gram(G_Q), _sv_from_gram(G_K), _sv_of_product(G_Q, G_K),
            _sv_from_gram(G_V), _sv_from_gram(H_O), _sv_of_product(G_V, H_O)]
    data = np.stack(vals, axis=2)                                   # (L, H, 6, e)
    return xr.DataArray(data, dims=("layer", "head", "matrix", "index"),
                        coords={"layer": np.arange(data.shape[0]), "head": np.arange(data.shape[1]),
                                "matrix": list(MATRICES)}, name="singular_value")


def effective_rank(ds: xr.Dataset, *, energy: float = 0.99, dtype=np.float64) -> xr.Dataset:
    """Effective ranks and rank-r truncation errors of W_Q, W_K, W_QK, W_V, W_O, W_OV per head.

    From ``singular_values``; the definitions are in the module docstring. Computed at once
    (weights only).

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store.
    energy : float
        The share of sum s^2 that ``erank_energy`` must hold.
    dtype : numpy dtype
        What the singular values are computed in.

    Returns
    -------
    xarray.Dataset
        ``erank_entropy`` and ``erank_energy`` (layer, head, matrix), ``singular_value``
        (layer, head, matrix, index) and ``truncation_error`` (layer, head, matrix, rank), rank
        1..d_head: the relative Frobenius error of the best rank-r approximation. Attributes
        ``energy`` and ``note``.

    Raises
    ------
    MissingWeightsError
        The store has no ``W_Q``, ``W_K`` or ``W_V``.
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


def truncation_factors(W_a: np.ndarray, W_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, Q), d_head x d_head each, with ``truncation_map(W_a, W_b, r) == P[:, :r] @ Q[:r]`` for every rank r:
    the QRs and the SVD are made once per head, and each further rank costs one small product."""
    # W_a = Q_a R_a, W_b^T = Q_b R_b: W_a W_b = Q_a (R_a R_b^T) Q_b^T, so the SVD is of a d_head x d_head
    # matrix M = U S V^T, and X_r = R_a^+ M_r (R_b^T)^+ (W_a^+ = R_a^+ Q_a^T for orthonormal Q_a)
    _, r_a = np.linalg.qr(np.asarray(W_a, np.float64))
    _, r_b = np.linalg.qr(np.asarray(W_b, np.float64).T)
    u, s, vt = np.linalg.svd(r_a @ r_b.T)
    return np.linalg.pinv(r_a) @ (u * s), vt @ np.linalg.pinv(r_b.T)


def truncation_map(W_a: np.ndarray, W_b: np.ndarray, rank: int, factors=None) -> np.ndarray:
    """The d_head x d_head map X with W_a X W_b the best rank-``rank`` approximation of W_a W_b.

    A head's fused W_OV = W_V W_O (or W_QK = W_Q W_K^T) has rank <= d_head, so its Eckart-Young
    truncation lies in the column space of W_a and the row space of W_b: X = W_a^+ (W_a W_b)_r W_b^+
    reproduces it exactly, and replacing z by z X (or q by q X) in a live forward replaces the fused
    matrix by its truncation. Float64; X = I (to rounding) at rank = d_head with full-rank factors.
    ``factors``: the head's ``truncation_factors``, where several ranks of one head are wanted.
    """
    P, Q = truncation_factors(W_a, W_b) if factors is None else factors
    return P[:, :rank] @ Q[:rank]
