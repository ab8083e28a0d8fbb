"""An attention head's pattern and messages, recomputed from a store: the one place that knows how.

q, k and v are recomputed from the residual entering a layer (the store's own replay, exact), the
attention's input norm at each token's own scale, its static weights, and what the layout recorded
in the store's attributes (q/k norms, a clip, rotary style and the rotary or ALiBi tables each token
received and which layers rotate, sliding windows, a soft-cap, learned sinks, causality). ``streamtap.verify`` checks a head's stored output
against them (the second invariant); ``streamtap.analysis.attention`` and ``source_messages`` give
them to researchers. Nothing here imports torch.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from .errors import PatternsMissingError, StreamtapError
from .stream import Sum, block_norms, block_source, entries, from_json, replay


def require_patterns(ds: xr.Dataset) -> None:
    """Refuse a store that cannot give patterns, naming the fix."""
    if not ds.attrs.get("patterns"):
        raise PatternsMissingError("this store was captured without patterns: attention patterns and their check "
                                   "need the positional tables the model used. Capture again with patterns=True "
                                   "(--patterns)")
    missing = [n for n in ("W_Q", "W_K", "W_V") if n not in ds]
    if missing:
        raise PatternsMissingError(f"this store has no {', '.join(missing)}; patterns are recomputed from them")


def kv_map(ds: xr.Dataset) -> np.ndarray:
    """For each query head, its key/value head (grouped-query attention repeats each kv head)."""
    n_heads = ds.sizes["head"]
    n_kv = ds.sizes["kv_head"] if "kv_head" in ds.dims else n_heads
    return np.arange(n_heads) // (n_heads // n_kv)


def _static(ds: xr.Dataset, name: str, dtype) -> np.ndarray:
    var = ds[name]
    values = var.compute(scheduler="sync") if hasattr(var, "compute") else var
    return np.asarray(values.values, dtype=dtype)


def sequence_tokens(ds: xr.Dataset, seq: int) -> np.ndarray:
    """The store rows of sequence ``seq``, in position order."""
    seqs = np.asarray(ds["seq"].values)
    rows = np.flatnonzero(seqs == int(seq))
    if rows.size == 0:
        have = np.unique(seqs)
        span = f"{int(have.min())}..{int(have.max())} ({have.size} sequences)" if have.size else "none"
        raise StreamtapError(f"sequence {seq} is not in the store; its sequences are {span}")
    pos = np.asarray(ds["pos"].isel(token=rows).values)
    return rows[np.argsort(pos, kind="stable")]


class Attention:
    """A store's attention parameters, read once: what q, k, v and the scores are made of."""

    def __init__(self, ds: xr.Dataset, dtype=np.float64):
        self.dtype = dt = np.dtype(dtype)
        a = ds.attrs
        self.n_heads, self.d_head = int(a["n_heads"]), int(a["d_head"])
        self.kv = kv_map(ds)
        self.W_Q, self.W_K, self.W_V = _static(ds, "W_Q", dt), _static(ds, "W_K", dt), _static(ds, "W_V", dt)
        self.b = {n: _static(ds, f"b_{n}", dt) if f"b_{n}" in ds else None for n in "QKV"}
        self.W_O = _static(ds, "W_O", dt)
        self.norm = None
        if "attn_norm_weight" in ds:
            self.norm = (_static(ds, "attn_norm_weight", dt),
                         _static(ds, "attn_norm_bias", dt) if "attn_norm_bias" in ds else None,
                         a["attn_norm_kind"] == "layernorm", float(a["attn_norm_eps"]))
        self.identity_norms = set(a.get("attn_norm_identity") or ())   # layers whose attention reads x itself
        n_layers = int(a["n_layers"])
        self.scale = _static(ds, "attn_scale", dt) if "attn_scale" in ds else np.full(n_layers, self.d_head ** -0.5)
        self.qk_norm = None
        if "q_norm_weight" in ds:
            self.qk_norm = {s: (_static(ds, f"{s}_norm_weight", dt),
                                _static(ds, f"{s}_norm_bias", dt) if f"{s}_norm_bias" in ds else None) for s in "qk"}
            self.qk_scope, self.qk_center = a["qk_norm_scope"], a["qk_norm_kind"] == "layernorm"
            self.qk_eps = float(a["qk_norm_eps"])
        self.clip = a.get("qkv_clip")
        self.softcap = a.get("attn_softcap")
        self.sinks = _static(ds, "attn_sinks", dt) if "attn_sinks" in ds else None
        self.windows = list(a.get("attn_window") or [None] * n_layers)
        self.causal = bool(a.get("causal", True))
        self.positional = a.get("positional", "none")
        self.rotary = a.get("rotary_style", "half")
        self.groups = list(a.get("rotary_groups") or [0] * n_layers)
        self.rotates = [bool(r) for r in a.get("rotary_layers") or [True] * n_layers]

    # -- q, k, v ------------------------------------------------------------------------------------
    def _attn_input(self, x: np.ndarray, layer: int) -> np.ndarray:
        if self.norm is None or layer in self.identity_norms:
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
        if self.rotary == "interleaved_from_half":   # Ernie-4.5: the first half of full-width tables, each twice
            cos, sin = cos[..., :cos.shape[-1] // 2], sin[..., :sin.shape[-1] // 2]
        if self.rotary in ("interleaved", "interleaved_from_half"):   # GPT-J: one angle per pair of dims
            cos, sin = np.repeat(cos, 2, axis=-1), np.repeat(sin, 2, axis=-1)
        elif self.rotary == "halves":      # GPT-OSS: one table of half the width turns both halves
            cos, sin = np.concatenate([cos, cos], axis=-1), np.concatenate([sin, sin], axis=-1)
        # "interleaved_repeated" (Cohere): the tables hold each pair's angle twice already
        r = cos.shape[-1]
        if r > t.shape[-1]:
            raise StreamtapError(f"the store's rotary tables turn {r} dims under rotary_style {self.rotary!r}, more "
                                 f"than a head's {t.shape[-1]}: its rotary_style does not describe its tables; "
                                 "capture the store again with this streamtap, whose layouts declare the style")
        part = t[..., :r]
        if self.rotary.startswith("interleaved"):
            turned = np.stack([-part[..., 1::2], part[..., ::2]], axis=-1).reshape(part.shape)
        else:
            turned = np.concatenate([-part[..., r // 2:], part[..., :r // 2]], axis=-1)
        rotated = part * cos[:, None, :] + turned * sin[:, None, :]
        return np.concatenate([rotated, t[..., r:]], axis=-1)

    def _project(self, a: np.ndarray, layer: int, name: str) -> np.ndarray:
        W = {"Q": self.W_Q, "K": self.W_K, "V": self.W_V}[name]
        t = np.einsum("nd,hde->nhe", a, W[layer], optimize=True)
        return t + self.b[name][layer] if self.b[name] is not None else t

    def qkv(self, layer: int, x: np.ndarray, cos=None, sin=None):
        """(q (n, head, d_head), k and v (n, kv_head, d_head)) of the tokens whose residual entering
        ``layer`` is ``x`` (n, d_model); ``cos``/``sin``: their rotary tables for this layer."""
        a = self._attn_input(x.astype(self.dtype, copy=False), layer)
        q, k, v = (self._project(a, layer, name) for name in "QKV")
        if self.qk_norm is not None:
            q, k = self._qk_norm(q, "q", layer), self._qk_norm(k, "k", layer)
        if self.clip:
            q, k, v = (np.clip(t, -self.clip, self.clip) for t in (q, k, v))
        if cos is not None and self.rotates[layer]:   # a no-rope layer is given the tables but turns nothing
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        return q, k, v

    def values(self, layer: int, x: np.ndarray) -> np.ndarray:
        """v (n, kv_head, d_head) of the tokens whose residual entering ``layer`` is ``x``: the third
        part of ``qkv``, without computing q and k."""
        v = self._project(self._attn_input(x.astype(self.dtype, copy=False), layer), layer, "V")
        return np.clip(v, -self.clip, self.clip) if self.clip else v

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

    def scores(self, layer: int, heads, q, k, pos_q, pos_k, alibi_k=None) -> np.ndarray:
        """(head, queries, keys) pre-softmax scores of the chosen heads, -inf where a key is not seen."""
        kq = k[:, self.kv[heads]]                                        # (keys, head, d_head)
        scores = np.einsum("qhe,khe->hqk", q[:, heads], kq, optimize=True) * self.scale[layer]
        if alibi_k is not None:
            scores = scores + alibi_k[:, heads].T[:, None, :]
        if self.softcap:
            scores = self.softcap * np.tanh(scores / self.softcap)
        seen = self.visible(layer, pos_q, pos_k)
        return np.where(seen[None], scores, -np.inf)

    def score_magnitudes(self, layer: int, heads, q, k, pos_q, pos_k, alibi_k=None) -> np.ndarray:
        """(head, queries, keys) the magnitude each score is summed from, scale * sum_e |q_e k_e| (+ |ALiBi|),
        zero where a key is not seen: rounding q, k or the score moves it by at most this times the
        number of roundings in units of u, whatever the score itself cancels to (a soft-cap only shrinks it)."""
        kq = np.abs(k[:, self.kv[heads]])
        mags = np.einsum("qhe,khe->hqk", np.abs(q[:, heads]), kq, optimize=True) * abs(self.scale[layer])
        if alibi_k is not None:
            mags = mags + np.abs(alibi_k[:, heads]).T[:, None, :]
        return np.where(self.visible(layer, pos_q, pos_k)[None], mags, 0.0)

    def sink_logits(self, layer: int, heads) -> np.ndarray | None:
        """(head,) the chosen heads' learned sink logits at ``layer``, or None where the model has none."""
        return None if self.sinks is None else self.sinks[layer][heads]

    @staticmethod
    def softmax(scores: np.ndarray, sinks: np.ndarray | None = None) -> np.ndarray:
        """Softmax over keys; ``sinks`` (head,) are logits of one more column that takes probability
        but is no key (GPT-OSS), so a row then sums to less than one, as in the model."""
        top = scores.max(-1, keepdims=True)
        extra = None if sinks is None else np.broadcast_to(np.asarray(sinks)[:, None, None], top.shape)
        if extra is not None:
            top = np.maximum(top, extra)
        weights = np.exp(scores - top)
        total = weights.sum(-1, keepdims=True)
        return weights / (total if extra is None else total + np.exp(extra - top))

    def pattern(self, layer: int, heads, q, k, pos_q, pos_k, alibi_k=None) -> np.ndarray:
        """(head, queries, keys) probabilities for the chosen heads."""
        return self.softmax(self.scores(layer, heads, q, k, pos_q, pos_k, alibi_k), self.sink_logits(layer, heads))


def rotary_arrays(ds_seq: xr.Dataset, group: int):
    """(cos, sin) of one rope group for the tokens of ``ds_seq``, as stored (lazy where the store is),
    or (None, None) without rotary tables."""
    if "rotary_cos" not in ds_seq:
        return None, None
    return ds_seq["rotary_cos"].isel(rope=group).data, ds_seq["rotary_sin"].isel(rope=group).data


def rotary_tables(ds_seq: xr.Dataset, group: int):
    """(cos, sin) of one rope group for the tokens of ``ds_seq`` in float64, or (None, None)."""
    return tuple(None if t is None else np.asarray(t, np.float64) for t in rotary_arrays(ds_seq, group))


RESIDUAL_TOKENS = ("embed", "pos_embed", "token_type_embed", "z", "mlp_out", "mixer_out", "norm_scale")
RESIDUAL_STATICS = ("W_O", "attn_bias", "norm_weight", "norm_bias")


def residual_arrays(ds_seq: xr.Dataset) -> dict:
    """The arrays the replay of a sequence's residual reads (per-token terms and frozen scales, W_O,
    the biases, the norms), as stored: lazy where the store is. A graph built from these alone (not
    from the whole Dataset, whose derived variables share source chunks with them) is what
    ``dask.delayed`` may be given: dask's optimisation of a Dataset collection can cull a source
    chunk that another of its variables still needs ("Missing dependency")."""
    names = [n for n in RESIDUAL_TOKENS + RESIDUAL_STATICS if n in ds_seq]
    return {n: ds_seq[n].data for n in names}


def replay_residuals(events: list, arrays: dict, center: np.ndarray, layers, dtype=np.float64) -> np.ndarray:
    """(n, layer, d_model): the residual entering each of ``layers``, replayed in numpy from
    ``arrays`` (``residual_arrays``, computed) through the stream ``events``."""
    b = {n: np.asarray(a, dtype) for n, a in arrays.items()}
    n, d_model = b["z"].shape[0], b["W_O"].shape[-1]
    out = np.empty((n, len(layers), d_model), dtype)
    where = {(int(layer), "attn"): i for i, layer in enumerate(layers)}

    def on_enter(layer, site, acc):
        if (layer, site) in where:
            out[:, where[(layer, site)]] = acc.total

    stop = max(entries(events)[key] for key in where) + 1
    replay(events, block_norms(b, center), block_source(b, dtype), Sum(), on_enter=on_enter, stop=stop)
    return out


def norm_centers(ds: xr.Dataset) -> np.ndarray:
    """For each norm inside the stream, whether it subtracts the mean; empty without such norms."""
    return np.asarray(ds["norm_center"].values, bool) if "norm_center" in ds else np.zeros(0, bool)


def sequence_residuals(ds_seq: xr.Dataset, layers, dtype=np.float64) -> np.ndarray:
    """(n, layer, d_model): the residual entering each of ``layers`` for the tokens of ``ds_seq`` (a
    sequence), replayed through the store's stream in numpy (its inputs read here, synchronously)."""
    arrays = {n: _static(ds_seq, n, dtype) for n in residual_arrays(ds_seq)}
    return replay_residuals(from_json(ds_seq.attrs["stream"]), arrays, norm_centers(ds_seq), layers, dtype)


PATTERN_BYTES = 512 << 20   # patterns and scores held at once per sequence and layer: heads go in blocks


class SequenceAttention:
    """One stored sequence's attention at one layer for a block of heads: its tokens' ids and positions,
    the heads (``heads``), their patterns and scores (head, query, key), the layer's queries
    (token, head, d_head), keys and values (token, kv_head, d_head), and its ALiBi rows (or None)."""

    def __init__(self, ids, pos, heads, pattern, scores, v, q=None, k=None, alibi=None):
        self.ids, self.pos, self.heads, self.pattern, self.scores, self.v = ids, pos, heads, pattern, scores, v
        self.q, self.k, self.alibi = q, k, alibi


def head_blocks(n_heads: int, n_tokens: int, dtype, max_bytes: int | None = None) -> list[np.ndarray]:
    """Heads in blocks whose patterns and scores (2 x heads x tokens^2) fit in ``max_bytes``: a long
    sequence is computed a head or a few at a time, a short one all heads at once."""
    per_head = 2 * n_tokens * n_tokens * np.dtype(dtype).itemsize
    max_bytes = PATTERN_BYTES if max_bytes is None else max_bytes
    size = int(max(1, min(n_heads, max_bytes // max(per_head, 1))))
    return [np.arange(i, min(i + size, n_heads)) for i in range(0, n_heads, size)]


def sequence_attention(ds: xr.Dataset, seqs=None, layers=None, *, dtype=np.float64, att: Attention | None = None,
                       max_bytes: int | None = None):
    """Yield ``(seq, layer, SequenceAttention)`` for each stored sequence (``seqs``, default all), layer
    (default all) and block of heads (``head_blocks``): the residual of a sequence is replayed once for
    all its layers, and no more than ``max_bytes`` of patterns is held at once."""
    require_patterns(ds)
    att = att or Attention(ds, dtype)
    layers = np.arange(ds.sizes["layer"]) if layers is None else np.atleast_1d(np.asarray(layers, int))
    seqs = np.unique(np.asarray(ds["seq"].values)) if seqs is None else np.atleast_1d(np.asarray(seqs, int))
    for seq in seqs:
        sub = ds.isel(token=sequence_tokens(ds, int(seq)))
        resid = sequence_residuals(sub, layers, dtype)
        pos = np.asarray(sub["pos"].values)
        ids = np.asarray(sub["token_id"].values)
        alibi = np.asarray(sub["alibi"].values, dtype) if "alibi" in sub else None
        for i, layer in enumerate(layers):
            cos, sin = rotary_tables(sub, att.groups[layer])
            q, k, v = att.qkv(int(layer), resid[:, i], cos, sin)
            for heads in head_blocks(ds.sizes["head"], pos.size, dtype, max_bytes):
                scores = att.scores(int(layer), heads, q, k, pos, pos, alibi)
                yield int(seq), int(layer), SequenceAttention(ids, pos, heads, att.softmax(scores, att.sink_logits(layer, heads)),
                                                                    scores, v, q, k, alibi)


def output_scale(att: Attention, layer: int, one: SequenceAttention, out: np.ndarray, *, values=None,
                 queries=None) -> np.ndarray:
    """(query, head) the magnitude M the second invariant's error is measured against: the largest
    component of

        M_i = sum_j A_ij |v_j|  +  sum_j A_ij (S_ij + S_i) |v_j - o_i|,   S_i = sum_j A_ij S_ij

    with o_i = sum_j A_ij v_j (``out``), S_ij the magnitude the score s_ij is summed from
    (``Attention.score_magnitudes``) and the sums over the keys the query sees plus, where the model has
    learned sinks, the sink as one more key with value zero and S = |its logit|. Why: a relative rounding
    u in v or A moves o_i by at most u sum_j A_ij |v_j| (the summands' magnitude, as the residual
    invariant measures a sum against its partial sums, not its cancelled result); a rounding that moves
    score s_ij by d_ij <= u S_ij moves A_ij by A_ij (d_ij - sum_k A_ik d_ik) and o_i by
    sum_j A_ij (d_ij - d_i)(v_j - o_i), at most u sum_j A_ij (S_ij + S_i) |v_j - o_i|: zero for a query
    that sees one key, large where q and k are (the model's own softmax is then only that accurate).

    ``values`` (key, head, width): the vectors the pattern averages, default the heads' own v; a head's
    messages v_j W_O give the same measure in d_model (``ov_edges``' ``error_scale``). ``queries``: only
    these rows of the pattern (``out`` holds theirs), for a caller that needs a few queries of a long sequence."""
    rows = slice(None) if queries is None else np.asarray(queries, int)
    A = one.pattern[:, rows]                                            # (head, query, key)
    S = att.score_magnitudes(layer, one.heads, one.q[rows], one.k, one.pos[rows], one.pos, one.alibi)
    sink = np.clip(1.0 - A.sum(-1), 0.0, None)                          # the sinks' share; 0 without
    logits = att.sink_logits(layer, one.heads)
    S_sink = np.zeros(len(one.heads)) if logits is None else np.abs(logits)
    S_mean = (A * S).sum(-1) + sink * S_sink[:, None]                   # (head, query)
    v = one.v[:, att.kv[one.heads]] if values is None else values       # (key, head, e)
    summands = np.einsum("hqk,khe->qhe", A, np.abs(v), optimize=True)
    weights = A * (S + S_mean[..., None])                               # (head, query, key)
    moved = np.empty_like(summands)
    rows = max(1, PATTERN_BYTES // max(v.size * v.itemsize, 1))          # queries whose spread fits at once
    for i in range(0, out.shape[0], rows):
        spread = np.abs(v[None] - out[i:i + rows, None])                # (query, key, head, e)
        moved[i:i + rows] = np.einsum("hqk,qkhe->qhe", weights[:, i:i + rows], spread, optimize=True)
    moved += ((sink * (S_sink[:, None] + S_mean)).T)[..., None] * np.abs(out)
    return np.maximum((summands + moved).max(-1), 1e-300)


def output_errors(ds: xr.Dataset, seq: int, *, dtype=np.float64) -> xr.DataArray:
    """How far each head's stored output is from sum_j A[i, j] v_j recomputed: (token, layer, head).

    Compared in the head's value space (z, the input of the output projection): max_e |z_i - o_i| over
    the magnitude the model's own rounding acts on (``output_scale``: the values' magnitudes, and the
    spread of the values weighted by how large the scores are summed from), so that the store's
    tolerance (``streamtap.tolerance``) bounds it as it bounds the residual invariant. Where the model's
    value bias is part of v it is part of both sides.
    """
    att = Attention(ds, dtype)
    sub = ds.isel(token=sequence_tokens(ds, seq))
    n, L, H = sub.sizes["token"], ds.sizes["layer"], ds.sizes["head"]
    z = np.asarray(sub["z"].values, dtype)
    errors = np.empty((n, L, H), dtype)
    # output_scale holds two more (head, query, key) arrays beside the pattern and scores: half the blocks
    for _, layer, one in sequence_attention(ds, [seq], dtype=dtype, att=att, max_bytes=PATTERN_BYTES // 2):
        out = np.einsum("hqk,khe->qhe", one.pattern, one.v[:, att.kv[one.heads]], optimize=True)
        scale = output_scale(att, layer, one, out)
        errors[:, layer, one.heads] = np.abs(out - z[:, layer, one.heads]).max(-1) / scale
    coords = {name: ("token", np.asarray(sub[name].values)) for name in ("seq", "pos", "token_id")}
    coords.update(layer=np.arange(L), head=np.arange(H))
    return xr.DataArray(errors, dims=("token", "layer", "head"), coords=coords, name="output_error")


__all__ = ["Attention", "SequenceAttention", "sequence_attention", "head_blocks", "PATTERN_BYTES", "require_patterns", "sequence_tokens",
           "sequence_residuals", "rotary_tables", "output_errors", "output_scale",
           "kv_map"]
