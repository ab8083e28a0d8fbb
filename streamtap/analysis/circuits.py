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
from ._vocab import as_text, token_ids, vocab_text

ROTARY_NOTE = ("rotary model: this position-free map ignores the rotation of queries and keys by "
               "position; it is the score two tokens would get at the same position (offset 0), not "
               "how the head weighs them at other offsets")


def _dask_per_query_head(ds, name, dtype):
    """W_Q, W_K or W_V as lazy (layer, head, d_model, d_head), one chunk per head, kv heads repeated."""
    require(ds, name)
    var = ds[name]
    data = var.data if isinstance(var.data, da.Array) else da.from_array(np.asarray(var.data))
    data = data.astype(dtype)
    if "kv_head" in var.dims:
        data = data[:, kv_heads(ds)]
    return data.rechunk((1, 1, -1, -1))


def qk_matrix(ds: xr.Dataset, *, dtype=np.float32) -> xr.DataArray:
    """The fused query-key matrix W_QK = W_Q W_K^T of every head, lazily.

    x_i W_QK x_j^T is head h's unscaled score of query x_i on key x_j, biases and positions aside
    (see the module docstring for what it leaves out on rotary models). One chunk per head, so a
    selection of heads computes only those.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store.
    dtype : numpy dtype
        What the product is computed in.

    Returns
    -------
    xarray.DataArray
        ``W_QK`` (layer, head, d_model_q, d_model_k); with grouped-query attention query head h uses
        kv head h // (n_heads / n_kv_heads). Attributes ``note``, and ``rotary_note`` and
        ``attn_notes`` where they apply.

    Raises
    ------
    MissingWeightsError
        The store has no ``W_Q`` or ``W_K``.
    """
    W_Q = _dask_per_query_head(ds, "W_Q", dtype)
    W_K = _dask_per_query_head(ds, "W_K", dtype)
    data = da.einsum("lhqe,lhke->lhqk", W_Q, W_K)
    return xr.DataArray(data, dims=("layer", "head", "d_model_q", "d_model_k"), name="W_QK",
                        attrs=_notes(ds, "x_i W_QK x_j^T is the (unscaled) score of query x_i on key x_j"))


def ov_matrix(ds: xr.Dataset, *, dtype=np.float32) -> xr.DataArray:
    """The fused value-output matrix W_OV = W_V W_O of every head, lazily.

    x W_OV is the message a key x contributes to the residual per unit of attention, the value
    bias aside. One chunk per head.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store.
    dtype : numpy dtype
        What the product is computed in.

    Returns
    -------
    xarray.DataArray
        ``W_OV`` (layer, head, d_model_in, d_model_out). Attributes as for ``qk_matrix``.

    Raises
    ------
    MissingWeightsError
        The store has no ``W_V``.
    """
    W_V = _dask_per_query_head(ds, "W_V", dtype)
    W_O = ds["W_O"].data if isinstance(ds["W_O"].data, da.Array) else da.from_array(np.asarray(ds["W_O"].data))
    W_O = W_O.astype(dtype).rechunk((1, 1, -1, -1))
    data = da.einsum("lhie,lheo->lhio", W_V, W_O)
    return xr.DataArray(data, dims=("layer", "head", "d_model_in", "d_model_out"), name="W_OV",
                        attrs=_notes(ds, "x W_OV is the message a key x contributes per unit attention"))


def _notes(ds, what: str) -> dict:
    """The attributes every result here carries: what it is, and what the model does beyond the weights."""
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
        rows = rows + beta[:, None, :] if beta is not None else rows
        identity = np.isin(np.asarray(layer_ids), list(ds.attrs.get("attn_norm_identity") or ()))
        return np.where(identity[:, None, None], E[None], rows)   # layers whose attention reads x itself
    return np.broadcast_to(E, (len(layer_ids), *E.shape))


def _token_axis(ds, ids, tokenizer, name):
    """Coordinates of a token axis ``name``: position, ``<name>_id`` and ``<name>_text``."""
    return {name: np.arange(len(ids)), f"{name}_id": (name, np.asarray(ids, np.int64)),
            f"{name}_text": (name, as_text(vocab_text(ds, ids, tokenizer)))}


def _resolve(ds, tokens, tokenizer, layers):
    """(vocabulary ids of ``tokens``, layer indices: ``layers`` or all)."""
    ids = token_ids(ds, tokens, tokenizer)
    layer_ids = np.arange(ds.sizes["layer"]) if layers is None else np.atleast_1d(np.asarray(layers, int))
    return ids, layer_ids


def relevance(ds: xr.Dataset, tokens, *, tokenizer=None, layers=None, input_norm=None,
              dtype=np.float64) -> xr.Dataset:
    """Token-to-token relevance E W_QK E^T of every head, for chosen tokens.

    How much a query token would attend to a key token by content alone: the chosen tokens'
    embeddings (through the layer's input norm where the store has it) multiplied through W_Q and
    W_K, biases and positions aside. Computed at once (weights only).

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store.
    tokens : sequence of int or str
        Vocabulary ids or token strings (resolved with ``tokenizer`` or the store's vocabulary
        text, see ``token_ids``); they are both the queries and the keys.
    tokenizer : optional
        Resolves token strings and gives the ids' text.
    layers : int or sequence of int, optional
        The layers to compute (default: all).
    input_norm : bool, optional
        Pass the embeddings through the layer's input norm (``attn_norm_weight``) first. Default:
        where the store has that norm.
    dtype : numpy dtype
        What the products are computed in.

    Returns
    -------
    xarray.Dataset
        Over (layer, head, query, key): ``raw``, the unscaled bilinear score, and ``normalized``,
        the softmax over the chosen keys of raw times the model's score scale (``attn_scale``:
        1/sqrt(d_head) in most models, 1 in GPT-Neo, Gemma-2's query_pre_attn_scalar): the
        attention a query token would pay among these keys alone (rows sum to 1; to less where the
        store has learned sinks, ``attn_sinks``, which take their share as in the model). Coordinates
        ``query_id``, ``query_text``, ``key_id``, ``key_text``; attributes ``note``,
        ``normalized``, ``input_norm`` and, where they apply, ``rotary_note`` and ``attn_notes``.

    Raises
    ------
    MissingWeightsError
        The store has no ``W_Q``, ``W_K`` or token embedding (or no ``attn_norm_weight`` when
        ``input_norm=True``).
    StreamtapError
        A token string that does not resolve to one token.
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
    sinks = static(ds, "attn_sinks", dtype)[layer_ids][:, :, None, None] if "attn_sinks" in ds else None
    top = scaled.max(-1, keepdims=True) if sinks is None else np.maximum(scaled.max(-1, keepdims=True), sinks)
    weights = np.exp(scaled - top)
    total = weights.sum(-1, keepdims=True) + (0 if sinks is None else np.exp(sinks - top))
    norm = weights / total
    coords = {"layer": layer_ids, "head": np.arange(ds.sizes["head"]),
              **_token_axis(ds, ids, tokenizer, "query"), **_token_axis(ds, ids, tokenizer, "key")}
    dims = ("layer", "head", "query", "key")
    attrs = _notes(ds, "relevance of key tokens to query tokens, E W_QK E^T")
    attrs["normalized"] = "softmax over the chosen keys of raw * attn_scale (the model's score scale, 1/sqrt(d_head) in most)"
    if sinks is not None:
        attrs["normalized"] += ("; the head's learned sink logit (attn_sinks) is one more column of the softmax, as in "
                                "the model, so a row sums to less than 1")
    attrs["input_norm"] = int(bool(("attn_norm_weight" in ds) if input_norm is None else input_norm))
    return xr.Dataset({"raw": (dims, raw), "normalized": (dims, norm)}, coords=coords, attrs=attrs)


def promotion(ds: xr.Dataset, tokens, *, tokenizer=None, layers=None, input_norm=None,
              through_final_norm: bool = True, dtype=np.float64) -> xr.Dataset:
    """Token-to-token promotion E W_OV W_U^T of every head, for chosen tokens.

    Which tokens a token's message raises when the head attends to it fully: the chosen tokens'
    embeddings (through the layer's input norm where the store has it) multiplied through W_V, W_O
    and the unembedding, biases aside. Computed at once (weights only).

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store.
    tokens : sequence of int or str
        Vocabulary ids or token strings (see ``token_ids``); they are both sources and targets.
    tokenizer : optional
        Resolves token strings and gives the ids' text.
    layers : int or sequence of int, optional
        The layers to compute (default: all).
    input_norm : bool, optional
        Pass the embeddings through the layer's input norm (``attn_norm_weight``) first. Default:
        where the store has that norm.
    through_final_norm : bool
        Read messages through the final norm's gamma (and its centring for a LayerNorm); the
        per-token scale is left out either way.
    dtype : numpy dtype
        What ``raw`` is computed in (the vocabulary-wide statistics use float32 logits).

    Returns
    -------
    xarray.Dataset
        Over (layer, head, source, target): ``raw[source, target]``, the logit of ``target`` that a
        fully attended ``source`` token's message adds; ``normalized``, the same row as z-scores
        over the whole vocabulary (3 means the target is raised three standard deviations more than
        a typical token). Coordinates ``source_id``, ``source_text``, ``target_id``,
        ``target_text``; attributes ``note``, ``normalized``, ``through_final_norm`` and, where
        they apply, ``rotary_note`` and ``attn_notes``.

    Raises
    ------
    MissingWeightsError
        The store has no ``W_V``, ``W_U`` or token embedding (or no ``attn_norm_weight`` when
        ``input_norm=True``).
    StreamtapError
        A token string that does not resolve to one token.
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
