"""Patterns and messages as matrices: the fused W_QK and W_OV of every head, and what they do to tokens.

For head h of layer l, with row vectors x (the residual as the layer reads it):

    score(query x_i, key x_j) = x_i W_Q W_K^T x_j^T / sqrt(d_head)  -> W_QK = W_Q W_K^T   (d_model x d_model)
    message of key x_j          = x_j W_V W_O                        -> W_OV = W_V W_O     (d_model x d_model)

W_Q is (layer, head, d_model, d_head); W_K and W_V are (layer, kv_head, d_model, d_head), and with
grouped-query attention query head h uses kv head h // (n_heads / n_kv_heads). Biases of q, k and v
are not part of the fused matrices.

Token-to-token maps for a chosen set of tokens, from their embeddings E (rows of W_E, each token's
embedding term; a store keeps it once as W_U where the two are the same):

    relevance  E W_QK E^T           how much a query token attends to a key token, position aside
    promotion  E W_OV (gamma * W_U)^T  which tokens a token's message raises when it is attended to

Where the store has the layer's input-norm weights (``attn_norm_weight``), embeddings pass through
that norm first, as the layer would read them. What else a model does to queries and keys (q/k
norms, soft-capping, ALiBi) is listed in the store's ``attn_notes`` and copied into the results' attrs. Models with rotary positions rotate queries and keys
by position before the product: the position-free map is what the head would compute for two tokens
at the same position, and says nothing about how the rotation reweights other offsets.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from ._store import (embedding_matrix, final_norm, is_rotary, kv_heads, local, per_query_head, require, static)
from ._vocab import token_ids, vocab_text

ROTARY_NOTE = ("rotary model: this position-free map ignores the rotation of queries and keys by "
               "position; it is the score two tokens would get at the same position (offset 0), not "
               "how the head weighs them at other offsets")


def _dask_per_query_head(ds, name, dtype):
    require(ds, name)
    var = ds[name]
    data = var.data if isinstance(var.data, da.Array) else da.from_array(np.asarray(var.data))
    data = data.astype(dtype)
    if "kv_head" in var.dims:
        data = data[:, kv_heads(ds)]
    return data.rechunk((1, 1, -1, -1))


def qk_matrix(ds: xr.Dataset, *, dtype=np.float32) -> xr.DataArray:
    """W_QK = W_Q W_K^T per head: (layer, head, d_model_q, d_model_k), lazy, one chunk per head."""
    W_Q = _dask_per_query_head(ds, "W_Q", dtype)
    W_K = _dask_per_query_head(ds, "W_K", dtype)
    data = da.einsum("lhqe,lhke->lhqk", W_Q, W_K)
    return xr.DataArray(data, dims=("layer", "head", "d_model_q", "d_model_k"), name="W_QK",
                        attrs=_notes(ds, "x_i W_QK x_j^T is the (unscaled) score of query x_i on key x_j"))


def ov_matrix(ds: xr.Dataset, *, dtype=np.float32) -> xr.DataArray:
    """W_OV = W_V W_O per head: (layer, head, d_model_in, d_model_out), lazy, one chunk per head."""
    W_V = _dask_per_query_head(ds, "W_V", dtype)
    W_O = ds["W_O"].data if isinstance(ds["W_O"].data, da.Array) else da.from_array(np.asarray(ds["W_O"].data))
    W_O = W_O.astype(dtype).rechunk((1, 1, -1, -1))
    data = da.einsum("lhie,lheo->lhio", W_V, W_O)
    return xr.DataArray(data, dims=("layer", "head", "d_model_in", "d_model_out"), name="W_OV",
                        attrs=_notes(ds, "x W_OV is the message a key x contributes per unit attention"))


def _notes(ds, what: str) -> dict:
    attrs = {"note": what + "; q/k/v biases excluded"}
    if is_rotary(ds):
        attrs["rotary_note"] = ROTARY_NOTE
    if ds.attrs.get("attn_notes"):
        attrs["attn_notes"] = "; ".join(ds.attrs["attn_notes"])
    return attrs


def _embed_rows(ds, ids, layer_ids, input_norm, dtype) -> np.ndarray:
    """(layer, S, d_model): the chosen tokens' embeddings as each layer's attention reads them."""
    E = np.asarray(local(embedding_matrix(ds).isel(vocab=np.asarray(ids))).values, dtype)
    use = ("attn_norm_weight" in ds) if input_norm is None else input_norm
    if use:
        require(ds, "attn_norm_weight")
        gamma = static(ds, "attn_norm_weight", dtype)[layer_ids]
        beta = static(ds, "attn_norm_bias", dtype)[layer_ids] if "attn_norm_bias" in ds else None
        center = ds.attrs.get("attn_norm_kind", ds.attrs["final_norm_kind"]) == "layernorm"
        eps = float(ds.attrs.get("attn_norm_eps", ds.attrs["final_norm_eps"]))
        x = E - E.mean(-1, keepdims=True) if center else E
        var = (x ** 2).mean(-1, keepdims=True)
        rows = (x / np.sqrt(var + eps))[None] * gamma[:, None, :]
        return rows + beta[:, None, :] if beta is not None else rows
    return np.broadcast_to(E, (len(layer_ids), *E.shape))


def _token_axis(ds, ids, tokenizer, name):
    return {name: np.arange(len(ids)), f"{name}_id": (name, np.asarray(ids, np.int64)),
            f"{name}_text": (name, vocab_text(ds, ids, tokenizer).astype(str))}


def _resolve(ds, tokens, tokenizer, layers):
    ids = token_ids(ds, tokens, tokenizer)
    layer_ids = np.arange(ds.sizes["layer"]) if layers is None else np.atleast_1d(np.asarray(layers, int))
    return ids, layer_ids


def relevance(ds: xr.Dataset, tokens, *, tokenizer=None, layers=None, input_norm=None,
              dtype=np.float64) -> xr.Dataset:
    """Token-to-token relevance E W_QK E^T per head: Dataset (layer, head, query, key).

    ``raw`` is the unscaled bilinear score; ``normalized`` is the softmax over the chosen keys of
    raw times the model's score scale (``attn_scale``: 1/sqrt(d_head) in most models, 1 in GPT-Neo,
    Gemma-2's query_pre_attn_scalar): the attention a query token would pay among these keys alone
    (rows sum to 1).
    ``tokens`` are ids or token strings (resolved with ``tokenizer`` or the store's vocabulary text).
    """
    require(ds, "W_Q", "W_K")
    ids, layer_ids = _resolve(ds, tokens, tokenizer, layers)
    X = _embed_rows(ds, ids, layer_ids, input_norm, dtype)                  # (L, S, d)
    W_Q = static(ds, "W_Q", dtype)[layer_ids]
    W_K = per_query_head(ds, "W_K", dtype)[layer_ids]
    q = np.einsum("lsm,lhme->lhse", X, W_Q)
    k = np.einsum("lsm,lhme->lhse", X, W_K)
    raw = np.einsum("lhqe,lhke->lhqk", q, k)
    scale = static(ds, "attn_scale", dtype)[layer_ids] if "attn_scale" in ds else np.full(len(layer_ids), W_Q.shape[-1] ** -0.5)
    scaled = raw * scale[:, None, None, None]
    scaled = scaled - scaled.max(-1, keepdims=True)
    norm = np.exp(scaled) / np.exp(scaled).sum(-1, keepdims=True)
    coords = {"layer": layer_ids, "head": np.arange(ds.sizes["head"]),
              **_token_axis(ds, ids, tokenizer, "query"), **_token_axis(ds, ids, tokenizer, "key")}
    dims = ("layer", "head", "query", "key")
    attrs = _notes(ds, "relevance of key tokens to query tokens, E W_QK E^T")
    attrs["normalized"] = "softmax over the chosen keys of raw * attn_scale (the model's score scale, 1/sqrt(d_head) in most)"
    attrs["input_norm"] = int(bool(("attn_norm_weight" in ds) if input_norm is None else input_norm))
    return xr.Dataset({"raw": (dims, raw), "normalized": (dims, norm)}, coords=coords, attrs=attrs)


def promotion(ds: xr.Dataset, tokens, *, tokenizer=None, layers=None, input_norm=None,
              through_final_norm: bool = True, dtype=np.float64) -> xr.Dataset:
    """Token-to-token promotion E W_OV W_U^T per head: Dataset (layer, head, source, target).

    ``raw[source, target]``: the logit of ``target`` that a fully attended ``source`` token's message
    adds (through the final norm's gamma, and its centring for a LayerNorm, unless
    ``through_final_norm=False``; the per-token scale is left out). ``normalized``: the same row as
    z-scores over the whole vocabulary, so a value of 3 means the target is raised three standard
    deviations more than a typical token.
    """
    require(ds, "W_V", "W_U")
    ids, layer_ids = _resolve(ds, tokens, tokenizer, layers)
    X = _embed_rows(ds, ids, layer_ids, input_norm, dtype)
    W_V = per_query_head(ds, "W_V", dtype)[layer_ids]
    W_O = static(ds, "W_O", dtype)[layer_ids]
    msgs = np.einsum("lsm,lhme,lhen->lhsn", X, W_V, W_O, optimize=True)    # (L, H, S, d)
    if through_final_norm:
        msgs = final_norm(ds, dtype).fold(msgs)
    W_U = static(ds, "W_U", np.float32)          # vocabulary-wide statistics from float32 products
    U_ids = np.asarray(local(ds["W_U"].isel(vocab=np.asarray(ids))).values, dtype)
    raw = np.empty(msgs.shape[:3] + (len(ids),), dtype)
    normed = np.empty_like(raw)
    for i in range(msgs.shape[0]):                                          # one layer's logits at a time
        logits = msgs[i].astype(np.float32) @ W_U.T                         # (H, S, V)
        mean = logits.mean(-1, keepdims=True, dtype=np.float64)
        std = logits.std(-1, keepdims=True, dtype=np.float64)
        raw[i] = msgs[i] @ U_ids.T                                          # the chosen targets, in dtype
        normed[i] = (raw[i] - mean) / np.where(std > 0, std, 1)
    coords = {"layer": layer_ids, "head": np.arange(ds.sizes["head"]),
              **_token_axis(ds, ids, tokenizer, "source"), **_token_axis(ds, ids, tokenizer, "target")}
    dims = ("layer", "head", "source", "target")
    attrs = _notes(ds, "logit of target raised by the message of an attended source token, E W_OV W_U^T")
    attrs["normalized"] = "z-score of the row over the whole vocabulary"
    attrs["through_final_norm"] = int(through_final_norm)
    return xr.Dataset({"raw": (dims, raw), "normalized": (dims, normed)}, coords=coords, attrs=attrs)
