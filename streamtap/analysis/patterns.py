"""Attention patterns and per-source messages, recomputed offline from a store (docs/design.md,
"Patterns and messages").

Each head does two things. Its **pattern** A[i, j] says how much query token i reads source token j:
the softmax over the visible keys of the score, scale * q_i . k_j (plus an ALiBi bias, through a
soft-cap where the model has one). Each source token j sends a **source message** through the head's
value and output maps, m[j] = v_j W_O (v_j = attn_norm(x_j) W_V + b_V, the attention's input norm
frozen at j's own scale). The head's **output** at query i, the term that enters the stream (stored as
``z`` and derived as ``head_output``), is sum_j A[i, j] m[j]; the attention's output bias is a term of
its own.

Nothing here is stored per pair of tokens: q, k and v are recomputed from the residual entering each
layer (the store's own replay, exact) and the attention's static weights, with the positional tables
the model actually used (``patterns=True`` captures keep the rotary cos/sin or ALiBi biases of every
token). What an architecture does to q and k (q/k norms, a clip, rotary style, sliding windows, a
soft-cap) is recorded by its layout in the store's attributes.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import xarray as xr

from ..attention import (Attention, norm_centers, replay_residuals, require_patterns, residual_arrays, rotary_arrays,
                         sequence_tokens)
from ..stream import from_json
from ..errors import StreamtapError
from ._blocks import float_dtype, token_coords, tokens_map
from ._store import local, require
from ._vocab import as_text

MAX_TOKENS = 4096   # the longest sequence a pattern is recomputed for unless asked otherwise


def _check_index(name: str, values, size: int) -> np.ndarray:
    chosen = np.arange(size) if values is None else np.atleast_1d(np.asarray(values, dtype=int))
    bad = [int(v) for v in chosen if not 0 <= v < size]
    if bad:
        raise StreamtapError(f"{name} {bad} out of range: this store has {name}s 0..{size - 1}")
    return chosen


# -- the attention of one layer, recomputed ------------------------------------------------------------
def _sequence(ds: xr.Dataset, seq: int, max_tokens: int | None) -> xr.Dataset:
    rows = sequence_tokens(ds, seq)
    if max_tokens is not None and rows.size > max_tokens:
        raise StreamtapError(f"sequence {seq} has {rows.size:,} tokens, more than max_tokens={max_tokens:,}; a "
                             "pattern is (tokens x tokens) per head: pass a larger max_tokens if memory allows, or "
                             "ask for fewer layers and heads (the result is computed one head at a time)")
    return ds.isel(token=rows)


def attention(ds: xr.Dataset, seq: int, *, layers=None, heads=None, max_tokens: int | None = MAX_TOKENS,
              dtype=np.float64) -> xr.DataArray:
    """Every chosen head's attention pattern over one stored sequence: (layer, head, query, key), lazy.

    Recomputed from the store alone (the replayed residual, the attention's weights, the positional
    tables the model used); equal to the model's own attention probabilities (eager attention,
    ``output_attentions=True``) within 1e-5 in float32 (docs/architectures.md, "Patterns").

    Parameters
    ----------
    ds : xarray.Dataset
        A store captured with ``patterns=True``.
    seq : int
        The stored sequence.
    layers, heads : int or sequence of int, optional
        Which (default: all).
    max_tokens : int, optional
        Refuse longer sequences (memory grows with their square); None: no limit.
    dtype : numpy dtype
        What the scores are computed in.

    Returns
    -------
    xarray.DataArray
        (layer, head, query, key) probabilities, one dask chunk per layer and head; ``query`` and
        ``key`` carry ``*_pos``, ``*_token_id`` and ``*_text`` coordinates. Rows sum to 1.

    Raises
    ------
    PatternsMissingError
        The store was captured without patterns (``--patterns``).
    StreamtapError
        ``seq``, a layer or a head out of range, or a sequence longer than ``max_tokens``.
    """
    require_patterns(ds)
    dtype = float_dtype(dtype)
    layers = _check_index("layer", layers, ds.sizes["layer"])
    heads = _check_index("head", heads, ds.sizes["head"])
    sub = _sequence(ds, seq, max_tokens)
    n = sub.sizes["token"]
    att = Attention(ds, dtype)
    pos = np.asarray(local(sub["pos"]).values)
    alibi = np.asarray(local(sub["alibi"]).values, dtype) if "alibi" in sub else None
    # the graph is made of the arrays the recomputation reads, never of the Dataset (residual_arrays)
    resid = dask.delayed(replay_residuals, pure=True)(from_json(sub.attrs["stream"]), residual_arrays(sub),
                                                      norm_centers(sub), layers, dtype)

    def compute(resid, cos, sin, i, layer, head):
        cos, sin = (None, None) if cos is None else (np.asarray(cos, np.float64), np.asarray(sin, np.float64))
        q, k, _ = att.qkv(layer, resid[:, i], cos, sin)
        return att.pattern(layer, [head], q, k, pos, pos, alibi)[0][None, None]

    def one(i, layer, head):
        cos, sin = rotary_arrays(sub, att.groups[layer])
        return da.from_delayed(dask.delayed(compute)(resid, cos, sin, i, layer, head), shape=(1, 1, n, n), dtype=dtype)

    data = da.concatenate([da.concatenate([one(i, int(layer), int(head)) for head in heads], axis=1)
                           for i, layer in enumerate(layers)], axis=0)
    coords = {"layer": layers, "head": heads}
    for side in ("query", "key"):
        coords[side] = np.arange(n)
        coords[f"{side}_pos"] = (side, pos)
        coords[f"{side}_token_id"] = (side, np.asarray(local(sub["token_id"]).values))
        if "text" in sub.coords:
            coords[f"{side}_text"] = (side, as_text(local(sub["text"]).values))
    return xr.DataArray(data, dims=("layer", "head", "query", "key"), coords=coords, name="attention",
                        attrs={"seq": int(seq), "note": "probability that the query reads the key (rows sum to 1)"})


# -- per-source messages ---------------------------------------------------------------------------------
def source_messages(ds: xr.Dataset, *, layers=None, heads=None, dtype=np.float32) -> xr.DataArray:
    """What each token sends through each head if read: m[j] = v_j W_O, lazily (token, layer, head, d_model).

    Not the head's output at the query (``head_output``, sum_j A[i, j] m[j]): a source message is a
    property of the source token alone (its residual entering the layer, through the attention's input
    norm at its own scale, the value map with its bias, and the head's rows of the output projection).

    Parameters
    ----------
    ds : xarray.Dataset
        A store with W_V (any store; patterns are not needed).
    layers, heads : int or sequence of int, optional
        Which (default: all).
    dtype : numpy dtype

    Returns
    -------
    xarray.DataArray
        (token, layer, head, d_model), lazy, one block per token chunk.
    """
    require(ds, "W_V")
    dtype = float_dtype(dtype)
    layers = _check_index("layer", layers, ds.sizes["layer"])
    heads = _check_index("head", heads, ds.sizes["head"])
    from .decomposition import residual_stream

    stream = residual_stream(ds, depths=[(int(layer), "attn") for layer in layers], dtype=dtype)
    att = Attention(ds, dtype)
    data = tokens_map(_messages_block, ("token", "sel", "head", "d_model"),
                      {"sel": len(layers), "head": len(heads), "d_model": ds.sizes["d_model"]},
                      {"x": stream.rename(depth="sel")}, dtype=dtype, att=att, layers=[int(l) for l in layers],
                      heads=heads)
    coords = {**token_coords(ds), "layer": ("sel", layers), "head": heads}
    out = xr.DataArray(data, dims=("token", "sel", "head", "d_model"), coords=coords, name="source_message")
    return out.swap_dims(sel="layer").assign_attrs(
        note="what the token sends through the head if a query reads it: (attn_norm(x) W_V + b_V) W_O")


def _messages_block(b: dict, *, att: Attention, layers, heads) -> np.ndarray:
    x = b["x"]
    out = np.empty((x.shape[0], len(layers), len(heads), att.W_O.shape[-1]), att.dtype)
    for i, layer in enumerate(layers):
        _, _, v = att.qkv(layer, x[:, i])
        out[:, i] = np.einsum("nhe,hem->nhm", v[:, att.kv[heads]], att.W_O[layer][heads], optimize=True)
    return out


# -- the second invariant ----------------------------------------------------------------------------------
__all__ = ["attention", "source_messages", "MAX_TOKENS"]
