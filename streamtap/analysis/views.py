"""What each head looks for and what it says, over the whole vocabulary: its W_QK and W_OV maps read
through their top singular directions (docs/analysis.md, "Head views").

W_QK = W_Q W_K^T has rank at most d_head. Its singular directions come in pairs (u_r, w_r) with
score(x_i, x_j) = sum_r s_r (x_i . u_r)(x_j . w_r): a query whose embedding lies along u_r attends to
keys along w_r. Projecting every vocabulary token's embedding (as the layer reads it, through the
attention's input norm) on u_r names the tokens that **look for** something along that direction
(``query_*``), on w_r the tokens that are **looked for** (``key_*``). The top query tokens go with the
top key tokens, and the bottom with the bottom; both pairings raise the score.

W_OV = W_V W_O likewise: a source token along v_r sends a message along o_r. Projecting the embeddings
on v_r names the **sources** of direction r; o_r read through the final norm and the unembedding names
the tokens the message **says** (promotes; ``target_*``), the bottom ones those it argues against.

These views are position-free and bias-free (docs/analysis.md says what that leaves out): on rotary
models the QK view is what the head computes for two tokens at the same offset. The embedding is W_E
(stored, or the tied W_U); without tied embeddings the source and target sides use different matrices.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._store import embedding_matrix, final_norm, local, per_query_head, require, static
from ._vocab import topk_rows, vocab_text
from .circuits import _notes


def _thin_svd(A: np.ndarray, B: np.ndarray):
    """SVD of A B^T (A, B: d x r) without forming it: (U (d, r), s (r,), W (d, r))."""
    qa, ra = np.linalg.qr(A)
    qb, rb = np.linalg.qr(B)
    u, s, vt = np.linalg.svd(ra @ rb.T)
    return qa @ u, s, qb @ vt.T


def _read(ds: xr.Dataset, E: np.ndarray, layer: int) -> np.ndarray:
    """The vocabulary's embeddings as ``layer``'s attention reads them (through its input norm)."""
    if "attn_norm_weight" not in ds or layer in (ds.attrs.get("attn_norm_identity") or ()):
        return E
    gamma = static(ds, "attn_norm_weight", np.float64)[layer]
    beta = static(ds, "attn_norm_bias", np.float64)[layer] if "attn_norm_bias" in ds else None
    x = E - E.mean(-1, keepdims=True) if ds.attrs.get("attn_norm_kind") == "layernorm" else E
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + float(ds.attrs["attn_norm_eps"])) * gamma
    return x + beta if beta is not None else x


def head_views(ds: xr.Dataset, *, layers=None, heads=None, directions: int = 3, k: int = 8,
               tokenizer=None) -> xr.Dataset:
    """Every chosen head's top singular directions of W_QK and W_OV, each named by vocabulary tokens:
    Dataset (layer, head, direction, k), computed.

    Parameters
    ----------
    ds : xarray.Dataset
        A store with W_Q, W_K, W_V and an embedding (any store captured with weights).
    layers, heads : int or sequence of int, optional
        Which (default: all).
    directions : int
        How many singular directions of each map (at most d_head).
    k : int
        How many tokens name each end of a direction.
    tokenizer : optional
        Gives token text (default: the stored corpus's text, ``<id>`` for ids it lacks).

    Returns
    -------
    xarray.Dataset
        Over (layer, head, direction): ``qk_singular`` and ``ov_singular``; over (layer, head,
        direction, k): ``query_id``/``key_id`` (tokens along +u_r and +w_r, the strongest first),
        ``query_bottom_id``/``key_bottom_id`` (along -u_r and -w_r), ``source_id``/``source_bottom_id``
        (along +-v_r), ``target_id``/``target_bottom_id`` (the tokens o_r promotes most and least);
        each ``*_id`` has a ``*_text`` twin.

    Raises
    ------
    MissingWeightsError
        The store lacks W_Q, W_K, W_V or an embedding.
    """
    from .patterns import _check_index

    require(ds, "W_Q", "W_K", "W_V")
    layer_ids = _check_index("layer", layers, ds.sizes["layer"])
    head_ids = _check_index("head", heads, ds.sizes["head"])
    d_head = int(ds.attrs["d_head"])
    R = min(int(directions), d_head)
    E = np.asarray(local(embedding_matrix(ds)).values, np.float64)
    k = min(int(k), E.shape[0])
    W_Q = static(ds, "W_Q", np.float64)
    W_K = per_query_head(ds, "W_K", np.float64)
    W_V = per_query_head(ds, "W_V", np.float64)
    W_O = static(ds, "W_O", np.float64)
    say, center = None, False
    if "W_U" in ds:     # the output side reads o_r through the final norm's gamma and the unembedding
        p = final_norm(ds, np.float64)
        say, center = np.asarray(local(ds["W_U"]).values, np.float64) * p.gamma, p.center
    names = ["query", "key", "source", "target"]
    ids = {f"{n}{end}": np.full((len(layer_ids), len(head_ids), R, k), -1, np.int64)
           for n in names for end in ("", "_bottom")}
    sing = {m: np.zeros((len(layer_ids), len(head_ids), R)) for m in ("qk", "ov")}
    for a, layer in enumerate(layer_ids):
        read = _read(ds, E, int(layer))
        for b, head in enumerate(head_ids):
            u, s, w = _thin_svd(W_Q[layer, head], W_K[layer, head])
            v, s2, o = _thin_svd(W_V[layer, head], W_O[layer, head].T)
            sing["qk"][a, b], sing["ov"][a, b] = s[:R], s2[:R]
            sides = {"query": read @ u[:, :R], "key": read @ w[:, :R], "source": read @ v[:, :R]}
            if say is not None:
                sides["target"] = say @ (o[:, :R] - o[:, :R].mean(0) if center else o[:, :R])
            for name, proj in sides.items():
                ids[name][a, b] = topk_rows(proj.T, k)[0]
                ids[f"{name}_bottom"][a, b] = topk_rows(proj.T, k, largest=False)[0]
    dims = ("layer", "head", "direction", "k")
    out = xr.Dataset({"qk_singular": (dims[:3], sing["qk"]), "ov_singular": (dims[:3], sing["ov"])},
                     coords={"layer": layer_ids, "head": head_ids, "direction": np.arange(R), "k": np.arange(k)})
    for name, values in ids.items():
        if name.startswith("target") and say is None:
            continue
        out[f"{name}_id"] = (dims, values)
        out[f"{name}_text"] = (dims, vocab_text(ds, values, tokenizer).astype(str))
    attrs = _notes(ds, "top singular directions of W_QK (query/key sides) and W_OV (source side; target side "
                       "through the final norm and W_U), each named by its k strongest tokens at either end")
    if "W_U" not in ds:
        attrs["missing"] = "no W_U: the target side (what a head says) needs the unembedding"
    return out.assign_attrs(attrs)


__all__ = ["head_views"]
