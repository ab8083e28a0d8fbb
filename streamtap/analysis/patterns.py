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

from ..errors import StreamtapError
from ._blocks import float_dtype, token_coords, tokens_map
from ._store import MissingWeightsError, kv_heads, local, require, static
from ._vocab import as_text

MAX_TOKENS = 4096   # the longest sequence a pattern is recomputed for unless asked otherwise


class PatternsMissingError(MissingWeightsError):
    """The store was captured without ``patterns=True``."""


def require_patterns(ds: xr.Dataset) -> None:
    if not ds.attrs.get("patterns"):
        raise PatternsMissingError("this store was captured without patterns: attention patterns and source "
                                   "messages need the positional tables the model used. Capture again with "
                                   "patterns=True (--patterns)")
    require(ds, "W_Q", "W_K", "W_V")


def sequence_tokens(ds: xr.Dataset, seq: int) -> np.ndarray:
    """The store rows of sequence ``seq``, in position order."""
    seqs = np.asarray(local(ds["seq"]).values)
    rows = np.flatnonzero(seqs == int(seq))
    if rows.size == 0:
        have = np.unique(seqs)
        span = f"{int(have.min())}..{int(have.max())} ({have.size} sequences)" if have.size else "none"
        raise StreamtapError(f"sequence {seq} is not in the store; its sequences are {span}")
    pos = np.asarray(local(ds["pos"].isel(token=rows)).values)
    return rows[np.argsort(pos, kind="stable")]


def _check_index(name: str, values, size: int) -> np.ndarray:
    chosen = np.arange(size) if values is None else np.atleast_1d(np.asarray(values, dtype=int))
    bad = [int(v) for v in chosen if not 0 <= v < size]
    if bad:
        raise StreamtapError(f"{name} {bad} out of range: this store has {name}s 0..{size - 1}")
    return chosen


# -- the attention of one layer, recomputed ------------------------------------------------------------
class Attention:
    """A store's attention parameters, read once: what q, k, v and the scores are made of."""

    def __init__(self, ds: xr.Dataset, dtype=np.float64):
        self.dtype = dt = float_dtype(dtype)
        a = ds.attrs
        self.n_heads, self.d_head = int(a["n_heads"]), int(a["d_head"])
        self.kv = kv_heads(ds)
        self.W_Q, self.W_K, self.W_V = static(ds, "W_Q", dt), static(ds, "W_K", dt), static(ds, "W_V", dt)
        self.b = {n: static(ds, f"b_{n}", dt) if f"b_{n}" in ds else None for n in "QKV"}
        self.W_O = static(ds, "W_O", dt)
        self.norm = None
        if "attn_norm_weight" in ds:
            self.norm = (static(ds, "attn_norm_weight", dt),
                         static(ds, "attn_norm_bias", dt) if "attn_norm_bias" in ds else None,
                         a["attn_norm_kind"] == "layernorm", float(a["attn_norm_eps"]))
        n_layers = int(a["n_layers"])
        self.scale = static(ds, "attn_scale", dt) if "attn_scale" in ds else np.full(n_layers, self.d_head ** -0.5)
        self.qk_norm = None
        if "q_norm_weight" in ds:
            self.qk_norm = {s: (static(ds, f"{s}_norm_weight", dt),
                                static(ds, f"{s}_norm_bias", dt) if f"{s}_norm_bias" in ds else None) for s in "qk"}
            self.qk_scope, self.qk_center = a["qk_norm_scope"], a["qk_norm_kind"] == "layernorm"
            self.qk_eps = float(a["qk_norm_eps"])
        self.clip = a.get("qkv_clip")
        self.softcap = a.get("attn_softcap")
        self.windows = list(a.get("attn_window") or [None] * n_layers)
        self.causal = bool(a.get("causal", True))
        self.positional = a.get("positional", "none")
        self.rotary = a.get("rotary_style", "half")
        self.groups = list(a.get("rotary_groups") or [0] * n_layers)

    # -- q, k, v ------------------------------------------------------------------------------------
    def _attn_input(self, x: np.ndarray, layer: int) -> np.ndarray:
        if self.norm is None:
            return x
        gamma, beta, center, eps = self.norm
        y = x - x.mean(-1, keepdims=True) if center else x
        y = y / np.sqrt((y * y).mean(-1, keepdims=True) + eps) * gamma[layer]
        return y + beta[layer] if beta is not None else y

    def _qk_norm(self, t: np.ndarray, side: str, layer: int) -> np.ndarray:
        gamma, beta = self.qk_norm[side]
        g, bta = gamma[layer], None if beta is None else beta[layer]
        n, heads, dh = t.shape
        if self.qk_scope == "all":
            flat = t.reshape(n, heads * dh)
            flat = flat - flat.mean(-1, keepdims=True) if self.qk_center else flat
            flat = flat / np.sqrt((flat * flat).mean(-1, keepdims=True) + self.qk_eps) * g
            return (flat + bta if bta is not None else flat).reshape(n, heads, dh)
        y = t - t.mean(-1, keepdims=True) if self.qk_center else t
        y = y / np.sqrt((y * y).mean(-1, keepdims=True) + self.qk_eps)
        y = y * (g.reshape(-1, dh) if g.size > dh else g)            # one gamma per head, or one shared
        if bta is not None:
            y = y + (bta.reshape(-1, dh) if bta.size > dh else bta)
        return y

    def _rotate(self, t: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Queries or keys (n, heads, d_head) turned by the token's own cos and sin (n, width)."""
        if self.rotary == "interleaved":   # GPT-J: pairs of neighbouring dims, tables of half the width
            cos, sin = np.repeat(cos, 2, axis=-1), np.repeat(sin, 2, axis=-1)
        r = cos.shape[-1]
        part = t[..., :r]
        if self.rotary == "interleaved":
            turned = np.stack([-part[..., 1::2], part[..., ::2]], axis=-1).reshape(part.shape)
        else:
            turned = np.concatenate([-part[..., r // 2:], part[..., :r // 2]], axis=-1)
        rotated = part * cos[:, None, :] + turned * sin[:, None, :]
        return np.concatenate([rotated, t[..., r:]], axis=-1)

    def qkv(self, layer: int, x: np.ndarray, cos=None, sin=None):
        """(q (n, head, d_head), k and v (n, kv_head, d_head)) of the tokens whose residual entering
        ``layer`` is ``x`` (n, d_model); ``cos``/``sin``: their rotary tables for this layer."""
        a = self._attn_input(x.astype(self.dtype, copy=False), layer)
        out = []
        for name, W in (("Q", self.W_Q), ("K", self.W_K), ("V", self.W_V)):
            t = np.einsum("nd,hde->nhe", a, W[layer], optimize=True)
            if self.b[name] is not None:
                t = t + self.b[name][layer]
            out.append(t)
        q, k, v = out
        if self.qk_norm is not None:
            q, k = self._qk_norm(q, "q", layer), self._qk_norm(k, "k", layer)
        if self.clip:
            q, k, v = (np.clip(t, -self.clip, self.clip) for t in (q, k, v))
        if cos is not None:
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        return q, k, v

    def visible(self, layer: int, pos_q: np.ndarray, pos_k: np.ndarray) -> np.ndarray:
        """(queries, keys) bool: which keys each query sees (same sequence assumed)."""
        seen = np.ones((pos_q.size, pos_k.size), bool)
        diff = pos_q[:, None] - pos_k[None, :]
        if self.causal:
            seen &= diff >= 0
        window = self.windows[layer]
        if window:
            seen &= diff < window if self.causal else np.abs(diff) < window
        return seen

    def pattern(self, layer: int, heads, q, k, pos_q, pos_k, alibi_k=None) -> np.ndarray:
        """(head, queries, keys) probabilities for the chosen heads."""
        kq = k[:, self.kv[heads]]                                        # (keys, head, d_head)
        scores = np.einsum("qhe,khe->hqk", q[:, heads], kq, optimize=True) * self.scale[layer]
        if alibi_k is not None:
            scores = scores + alibi_k[:, heads].T[:, None, :]
        if self.softcap:
            scores = self.softcap * np.tanh(scores / self.softcap)
        seen = self.visible(layer, pos_q, pos_k)
        scores = np.where(seen[None], scores, -np.inf)
        scores = scores - scores.max(-1, keepdims=True)
        weights = np.exp(scores)
        return weights / weights.sum(-1, keepdims=True)


def _rotary_tables(ds_seq: xr.Dataset, group: int):
    if "rotary_cos" not in ds_seq:
        return None, None
    cos = np.asarray(ds_seq["rotary_cos"].isel(rope=group).values, np.float64)
    sin = np.asarray(ds_seq["rotary_sin"].isel(rope=group).values, np.float64)
    return cos, sin


def _residuals(ds_seq: xr.Dataset, layers, dtype) -> np.ndarray:
    """(n, layer, d_model): the residual entering each chosen layer, for a sequence's tokens."""
    from .decomposition import residual_stream

    return np.asarray(residual_stream(ds_seq, depths=[(int(layer), "attn") for layer in layers], dtype=dtype)
                      .values, dtype)


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
    resid = dask.delayed(_residuals)(sub, layers, dtype)
    alibi = np.asarray(local(sub["alibi"]).values, dtype) if "alibi" in sub else None

    def one(i, layer, head):
        def compute(resid):
            cos, sin = _rotary_tables(sub, att.groups[layer])
            q, k, _ = att.qkv(layer, resid[:, i], cos, sin)
            return att.pattern(layer, [head], q, k, pos, pos, alibi)[0][None, None]
        return da.from_delayed(dask.delayed(compute)(resid), shape=(1, 1, n, n), dtype=dtype)

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
def output_errors(ds: xr.Dataset, seq: int, *, dtype=np.float64) -> xr.DataArray:
    """How far each head's stored output is from sum_j A[i, j] v_j recomputed: (token, layer, head).

    Compared in the head's value space (z, the input of the output projection), per token and layer
    relative to the largest |z| of that token and layer; the store's tolerance applies
    (``streamtap.tolerance``). Where the model's value bias is part of v it is part of both sides.
    """
    require_patterns(ds)
    sub = _sequence(ds, seq, None)
    att = Attention(ds, dtype)
    n, L, H = sub.sizes["token"], ds.sizes["layer"], ds.sizes["head"]
    layers = np.arange(L)
    resid = _residuals(sub, layers, dtype)
    z = np.asarray(sub["z"].values, dtype)
    pos = np.asarray(sub["pos"].values)
    alibi = np.asarray(sub["alibi"].values, dtype) if "alibi" in sub else None
    errors = np.empty((n, L, H), dtype)
    heads = np.arange(H)
    for layer in layers:
        cos, sin = _rotary_tables(sub, att.groups[layer])
        q, k, v = att.qkv(layer, resid[:, layer], cos, sin)
        A = att.pattern(layer, heads, q, k, pos, pos, alibi)             # (head, query, key)
        out = np.einsum("hqk,khe->qhe", A, v[:, att.kv], optimize=True)
        scale = np.maximum(np.abs(z[:, layer]).max(axis=(1, 2)), 1e-30)   # per token
        errors[:, layer] = np.abs(out - z[:, layer]).max(-1) / scale[:, None]
    coords = {name: ("token", np.asarray(sub[name].values)) for name in ("seq", "pos", "token_id")}
    return xr.DataArray(errors, dims=("token", "layer", "head"), coords=coords, name="output_error")


__all__ = ["attention", "source_messages", "output_errors", "sequence_tokens", "Attention", "PatternsMissingError",
           "require_patterns", "MAX_TOKENS"]
