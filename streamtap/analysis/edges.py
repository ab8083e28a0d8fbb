"""Exact edges between stored terms: what a head moved (OV), why it attended (QK), what drove a neuron (MLP in).

With attention patterns and every norm's per-token scale frozen at the values the model used, three
maps from the stored residual terms are exactly linear or bilinear (docs/analysis.md, "Attribution
graphs"):

- **OV**: a head's output at query i is sum_j A[i, j] (N_j(x_j) W_V + b_V) W_O, and the residual x_j
  is the sum of the terms written before the layer (``decompose`` with ``upto``), so the output is a
  sum over (term c, source j) of A[i, j] N_j^lin(x_{c,j}) W_V W_O, plus the norm's beta and the value
  bias as terms of their own.
- **QK**: the pre-softmax score is scale * (R_i q_i) . (R_j k_j) (+ ALiBi), q_i and k_j each a sum of
  term contributions (the rotation R of a position, a q/k norm with its scale frozen, are linear), so
  the score is a sum over (query-side term a, key-side term b) pairs.
- **MLP in**: a neuron's pre-activation (gate and up separately in a gated MLP) is N_i^lin(x_i) W_in
  + b_in, a sum over the terms of the residual the MLP reads.

N^lin is the input norm's linear part at the token's own frozen scale, gamma * (x - [mean x]) * s.
What is not linear is left out on purpose and named: the softmax (patterns are frozen), an activation
function (a neuron node's inputs are exact, its output is the stored activation), a soft-cap (the
pre-cap score is decomposed), a clip of q/k/v (refused). Nothing here imports torch.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..attention import Attention, SequenceAttention, output_scale, require_patterns, rotary_tables, sequence_tokens
from ..errors import StreamtapError
from ..invariant import decompose, store_norms
from ..stream import FrozenNorms, Write, directions, from_json, is_plain, stop_index
from ._blocks import float_dtype
from ._store import local, require
from ._vocab import as_text


class EdgeError(StreamtapError):
    """An edge that cannot be given exactly on this store; the message says why."""


def _frozen(terms: np.ndarray, x: np.ndarray, gamma, beta, center: bool, eps: float):
    """``terms`` (C, n, d) through a norm's linear part at the per-token scale of their sum ``x`` (n, d),
    and its beta (d,) or None: sum of the result + beta = the norm of x."""
    xc = x - x.mean(-1, keepdims=True) if center else x
    s = 1.0 / np.sqrt((xc * xc).mean(-1) + eps)
    t = terms - terms.mean(-1, keepdims=True) if center else terms
    return t * (s[None, :, None] * gamma), (None if beta is None or not np.any(beta) else beta), s


class SequenceEdges:
    """One stored sequence, read once: its residual terms at each depth (cached), the attention's
    parameters, positions, positional tables and the model's own q, k, v, scores and patterns.

    The building block of :func:`ov_edges`, :func:`qk_edges`, :func:`mlp_edges` and the attribution
    graph; every method is exact in the sense of the module docstring.
    """

    def __init__(self, ds: xr.Dataset, seq: int, *, dtype=np.float64, patterns: bool = True, cache: int = 2):
        if patterns:
            require_patterns(ds)
        self.ds, self.seq, self.dtype = ds, int(seq), float_dtype(dtype)
        self.sub = ds.isel(token=sequence_tokens(ds, seq))
        self.n = self.sub.sizes["token"]
        self.pos = np.asarray(local(self.sub["pos"]).values)
        self.ids = np.asarray(local(self.sub["token_id"]).values)
        self.text = as_text(local(self.sub["text"]).values) if "text" in self.sub.coords else None
        self.att = Attention(ds, self.dtype) if "W_Q" in ds else None
        self.alibi = np.asarray(local(self.sub["alibi"]).values, self.dtype) if "alibi" in self.sub else None
        self._terms: dict = {}
        self._qkv: dict = {}
        self._statics: dict = {}
        self._inputs: dict = {}
        self.events = from_json(ds.attrs["stream"])
        self.plain = is_plain(self.events)
        self._norms = None
        self._final = None
        self._small = None
        self._cache = cache

    # -- positions ------------------------------------------------------------------------------------
    def position(self, position: int) -> int:
        """A position in the sequence (negative counts from its end); out of range is an error."""
        p = int(position) + (self.n if int(position) < 0 else 0)
        if not 0 <= p < self.n:
            raise StreamtapError(f"position {position} is out of range: sequence {self.seq} has {self.n} tokens "
                                 f"(positions 0..{self.n - 1}, or -1..-{self.n} from the end)")
        return p

    def check(self, layer: int, head: int | None = None) -> None:
        L, H = self.ds.sizes["layer"], self.ds.sizes["head"]
        if not 0 <= int(layer) < L:
            raise StreamtapError(f"layer {layer} is out of range: this store has layers 0..{L - 1}")
        if head is not None and not 0 <= int(head) < H:
            raise StreamtapError(f"head {head} is out of range: this store has heads 0..{H - 1}")

    # -- residual terms ----------------------------------------------------------------------------
    def terms(self, layer: int, site: str = "attn"):
        """(labels, kinds, terms (C, n, d_model)): decompose's components of the residual entering
        ``layer``'s ``site``, as they arrive there (through any norm inside the stream)."""
        key = (int(layer), site)
        if key not in self._terms:
            final = site == "final" or int(layer) >= self.ds.sizes["layer"]
            t = decompose(self._stream(), upto=None if final else key, dtype=self.dtype)   # lazy: labels only so far
            labels, kinds = [str(c) for c in t.component.values], [str(k) for k in t.kind.values]
            if self.plain:   # terms reach every depth unchanged: a prefix of the final decomposition, computed once
                if self._final is None:
                    whole = decompose(self._stream(), dtype=self.dtype)
                    self._final = np.asarray(local(whole.data), self.dtype)
                values = self._final[:len(labels)]
            else:
                values = np.asarray(local(t.data) if hasattr(t.data, "compute") else t.values, self.dtype)
            if len(self._terms) >= self._cache:
                self._terms.pop(next(iter(self._terms)))
            self._terms[key] = (labels, kinds, values)
        return self._terms[key]

    def reader(self, layer: int, site: str = "attn") -> int:
        """The index of the first stream event left out of what ``layer``'s ``site`` reads (``"final"``:
        every event), as ``terms`` reads it."""
        if site == "final" or int(layer) >= self.ds.sizes["layer"]:
            return len(self.events)
        return stop_index(self.events, (int(layer), site))

    def carry_back(self, w: np.ndarray, token: int, reader: int, site: str, layer: int) -> np.ndarray:
        """The direction on what ``site`` (``"attn"``: a head, ``"mlp"``: the MLP or a neuron) of ``layer``
        writes at ``token``, before any norm it passes, that measures its share of the residual read at
        event ``reader`` as ``w`` measures that residual: ``w`` carried back through the norms in between
        (the term's own post-sublayer norm, every later stream norm), each frozen at the token's scale.
        ``w`` itself on a stream without norms inside it. Exact: a frozen norm is linear (docs/design.md)."""
        if self.plain:
            return w
        if self._norms is None:
            norms = store_norms(self.ds, self.dtype)
            scale = None if "norm_scale" not in self.sub else np.asarray(local(self.sub["norm_scale"]).values, self.dtype)
            self._norms = FrozenNorms(norms.gamma, norms.beta, norms.center, scale)
            self._writes = {(e.site, e.layer): i for i, e in enumerate(self.events) if isinstance(e, Write)}
        n = self._norms
        at = FrozenNorms(n.gamma, n.beta, n.center, None if n.scale is None else n.scale[token:token + 1])
        index = self._writes[(site, int(layer))]
        for i, _, _, w_in in directions(self.events, at, np.asarray(w, self.dtype)[None], start=reader):
            if i == index:
                return w_in[0]
        raise StreamtapError(f"the {site} of layer {layer} writes after the event {reader} that reads it")

    def _stream(self) -> xr.Dataset:
        """The sequence's residual terms in memory as one chunk, with ``head_output`` computed in one einsum:
        what ``decompose`` reads, without the weights it does not (the vocabulary, neurons, q/k/v) and
        without a task per head and token chunk (ten times faster on SmolLM2, the same numbers)."""
        if self._small is None:
            skip = {"head_output", "neuron_out"} | {n for n, v in self.sub.data_vars.items()
                                                     if {"vocab", "neuron", "rope"} & set(v.dims) or n[:3] in
                                                     ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V")}
            small = self.sub.drop_vars(sorted(skip), errors="ignore").load()
            z, W_O = np.asarray(small["z"].values, self.dtype), np.asarray(small["W_O"].values, self.dtype)
            small["head_output"] = (("token", "layer", "head", "d_model"),
                                    np.einsum("tlhe,lhem->tlhm", z, W_O, optimize=True))
            self._small = small.chunk()
        return self._small

    def attn_input(self, layer: int):
        """(labels, kinds, terms (C', n, d_model), s (n,)): what the attention at ``layer`` reads, as a sum of
        terms: each residual term through the attention's input norm at its token's frozen scale, then
        the norm's beta (``L3_attn_norm_beta``) where it has one. s is the frozen scale (ones without a norm)."""
        if ("attn", layer) in self._inputs:
            return self._inputs[("attn", layer)]
        labels, kinds, t = self.terms(layer, "attn")
        if self.att.norm is None:
            return self._keep(("attn", layer), (labels, kinds, t, np.ones(self.n, self.dtype)))
        gamma, beta, center, eps = self.att.norm
        out, b, s = _frozen(t, t.sum(0), gamma[layer], None if beta is None else beta[layer], center, eps)
        return self._keep(("attn", layer),
                          _with_constant(labels, kinds, out, b, f"L{layer}_attn_norm_beta", "norm_beta") + (s,))

    def _keep(self, key, value):
        """Remember one sublayer's input terms (the last ``cache`` of them): a graph visits layers in order."""
        if len(self._inputs) >= self._cache:
            self._inputs.pop(next(iter(self._inputs)))
        self._inputs[key] = value
        return value

    def qkv(self, layer: int):
        """The model's own (q, k, v) at ``layer`` for every token, recomputed (cached per layer)."""
        if layer not in self._qkv:
            x = self.terms(layer, "attn")[2].sum(0)
            self._qkv = {layer: self.att.qkv(layer, x, *self.rotary(layer))}
        return self._qkv[layer]

    def rotary(self, layer: int):
        return rotary_tables(self.sub, self.att.groups[layer])

    def pattern(self, layer: int, head: int) -> np.ndarray:
        """(query, key) the head's attention probabilities, as the model computed them."""
        q, k, _ = self.qkv(layer)
        return self.att.pattern(layer, [head], q, k, self.pos, self.pos, self.alibi)[0]

    def refuse_nonlinear(self, what: str) -> None:
        if self.att.clip:
            raise EdgeError(f"{what} cannot be exact on this store: the model clips queries, keys and values to "
                            f"[-{self.att.clip:g}, {self.att.clip:g}] (qkv_clip), which is not linear in the terms")

    # -- OV --------------------------------------------------------------------------------------------
    def ov(self, layer: int, head: int, query: int, direction=None):
        """(labels, kinds, contributions): (C, source, d_model), or (C, source) measured along
        ``direction``, of every term at every source to the head's output at ``query``."""
        self.refuse_nonlinear("OV edges")
        att = self.att
        labels, kinds, a, _ = self.attn_input(layer)
        A = self.pattern(layer, head)[query]                                      # (source,)
        kv = att.kv[head]
        W = att.W_V[layer, kv] @ att.W_O[layer, head]                             # (d_model, d_model)
        b_V = None if att.b["V"] is None else att.b["V"][layer, kv] @ att.W_O[layer, head]
        if direction is not None:
            w = W @ np.asarray(direction, self.dtype)
            contrib = (a @ w) * A[None]                                            # (C, source)
            if b_V is not None:
                contrib = np.concatenate([contrib, (A * (b_V @ direction))[None]])
        else:
            contrib = np.einsum("cnd,de->cne", a, W, optimize=True) * A[None, :, None]
            if b_V is not None:
                contrib = np.concatenate([contrib, (A[:, None] * b_V)[None]])
        if b_V is not None:
            labels, kinds = labels + [f"L{layer}H{head}_b_V"], kinds + ["value_bias"]
        return labels, kinds, contrib

    def ov_scale(self, layer: int, head: int, query: int) -> float:
        """The magnitude the model's own rounding acts on in the head's output at ``query``: the second
        invariant's ``output_scale`` with the head's messages v_j W_O (d_model) as the values it averages."""
        q, k, v = self.qkv(layer)
        heads = np.array([head])
        messages = (v[:, self.att.kv[head]] @ self.att.W_O[layer, head])[:, None]    # (source, 1, d_model)
        one = SequenceAttention(self.ids, self.pos, heads, self.pattern(layer, head)[None], None, v, q, k, self.alibi)
        out = np.einsum("k,khe->he", one.pattern[0, query], messages)[None]            # (1, 1, d_model)
        return float(output_scale(self.att, layer, one, out, values=messages, queries=[query])[0, 0])

    # -- QK --------------------------------------------------------------------------------------------
    def _side(self, layer: int, head: int, token: int, side: str):
        """(labels, kinds, (T, d_head)): the query (``"q"``) or key (``"k"``) of ``head`` at ``token`` as a sum
        of terms, with its bias, q/k norm (frozen) and rotation applied to each."""
        att = self.att
        labels, kinds, a, _ = self.attn_input(layer)
        a = a[:, token]                                                           # (C, d_model)
        name = side.upper()
        W = {"Q": att.W_Q, "K": att.W_K}[name][layer]                             # (heads, d_model, d_head)
        t = np.einsum("cd,hde->che", a, W, optimize=True)
        bias = att.b[name]
        if bias is not None:
            t = np.concatenate([t, bias[layer][None]])
            labels, kinds = labels + [f"L{layer}_b_{name}"], kinds + ["qk_bias"]
        if att.qk_norm is not None:
            t, labels, kinds = self._frozen_qk_norm(t, side, layer, labels, kinds)
        cos, sin = self.rotary(layer)
        if cos is not None and att.rotates[layer]:   # a no-rope layer (SmolLM3) turns nothing
            C = t.shape[0]
            t = att._rotate(t, np.repeat(cos[token:token + 1], C, 0), np.repeat(sin[token:token + 1], C, 0))
        h = head if side == "q" else att.kv[head]
        return labels, kinds, t[:, h]

    def _frozen_qk_norm(self, t, side, layer, labels, kinds):
        """Terms (C, heads, d_head) of q or k through its norm's linear part at the scale of their sum (exact:
        with its scale frozen a norm is linear), and the norm's beta as a term."""
        att = self.att
        gamma, beta = att.qk_norm[side]
        g, b = gamma[layer], None if beta is None else beta[layer]
        C, heads, dh = t.shape
        total = t.sum(0)
        if att.qk_scope == "all":
            flat, tflat = total.reshape(heads * dh), t.reshape(C, heads * dh)
            fc = flat - flat.mean() if att.qk_center else flat
            s = 1.0 / np.sqrt((fc * fc).mean() + att.qk_eps)
            tc = tflat - tflat.mean(-1, keepdims=True) if att.qk_center else tflat
            out = (tc * s * g).reshape(C, heads, dh)
            beta_term = None if b is None else b.reshape(heads, dh)
        else:
            fc = total - total.mean(-1, keepdims=True) if att.qk_center else total
            s = 1.0 / np.sqrt((fc * fc).mean(-1) + att.qk_eps)                     # (heads,)
            tc = t - t.mean(-1, keepdims=True) if att.qk_center else t
            g = g.reshape(-1, dh) if g.size > dh else g
            out = tc * s[None, :, None] * g
            beta_term = None if b is None else np.broadcast_to(b.reshape(-1, dh) if b.size > dh else b, (heads, dh))
        if beta_term is not None and np.any(beta_term):
            out = np.concatenate([out, beta_term[None]])
            labels, kinds = labels + [f"L{layer}_{side}_norm_beta"], kinds + ["norm_beta"]
        return out, labels, kinds

    def qk(self, layer: int, head: int, query: int, key: int):
        """(query labels, kinds, key labels, kinds, matrix (A, B), alibi, score): the pre-softmax (pre-cap)
        score of (query, key) as a matrix of query-side x key-side term contributions; matrix.sum() + alibi
        == score."""
        self.refuse_nonlinear("QK edges")
        att = self.att
        if not att.visible(layer, self.pos[[query]], self.pos[[key]])[0, 0]:
            raise StreamtapError(f"query {query} does not see key {key} at layer {layer} (causal mask or sliding "
                                 "window): its score is masked, so there is nothing to explain; pick a visible key")
        ql, qkind, qt = self._side(layer, head, query, "q")
        kl, kkind, kt = self._side(layer, head, key, "k")
        matrix = att.scale[layer] * (qt @ kt.T)
        alibi = 0.0 if self.alibi is None else float(self.alibi[key, head])
        q, k, _ = self.qkv(layer)
        score = float(att.scale[layer] * (q[query, head] @ k[key, att.kv[head]])) + alibi
        return ql, qkind, kl, kkind, matrix, alibi, score

    # -- MLP in -----------------------------------------------------------------------------------------
    def mlp_input(self, layer: int):
        """(labels, kinds, terms (C', n, d_model)): what the MLP at ``layer`` reads, through its input norm
        frozen at each token's scale, with the norm's beta (``L3_mlp_norm_beta``)."""
        require(self.ds, "W_in")
        if ("mlp", layer) in self._inputs:
            return self._inputs[("mlp", layer)]
        site = self.ds.attrs.get("mlp_reads", "mlp")
        labels, kinds, t = self.terms(layer, site)
        if "mlp_norm_weight" not in self.ds:
            return self._keep(("mlp", layer), (labels, kinds, t, np.ones(self.n, self.dtype)))
        gamma = self._static("mlp_norm_weight", layer)
        beta = self._static("mlp_norm_bias", layer) if "mlp_norm_bias" in self.ds else None
        center, eps = self.ds.attrs["mlp_norm_kind"] == "layernorm", float(self.ds.attrs["mlp_norm_eps"])
        out, b, s = _frozen(t, t.sum(0), gamma, beta, center, eps)
        return self._keep(("mlp", layer), _with_constant(labels, kinds, out, b, f"L{layer}_mlp_norm_beta", "norm_beta") + (s,))

    def _static(self, name: str, layer: int | None = None) -> np.ndarray:
        """A static weight (one layer of it with ``layer``: a graph reads only the layers it visits), read once."""
        key = name if layer is None else (name, int(layer))
        if key not in self._statics:
            var = self.ds[name] if layer is None else self.ds[name].isel(layer=int(layer))
            self._statics[key] = np.asarray(local(var).values, self.dtype)
        return self._statics[key]

    def mlp(self, layer: int, token: int, neurons=None) -> dict:
        """{"labels", "kinds", "in" (C, N), "gate" (C, N) or None}: each term's contribution to the chosen
        neurons' pre-activations at ``token``; biases ``L3_b_in``/``L3_b_gate`` are terms of their own."""
        labels, kinds, a, _ = self.mlp_input(layer)
        a = a[:, token]
        sel = slice(None) if neurons is None else np.asarray(neurons, int)
        out = {"labels": labels + [f"L{layer}_b_in"], "kinds": kinds + ["mlp_in_bias"]}
        for name in ("in", "gate"):
            if f"W_{name}" not in self.ds:
                out[name] = None
                continue
            W = self._static(f"W_{name}", layer)[:, sel]
            b = self._static(f"b_{name}", layer)[sel] if f"b_{name}" in self.ds else np.zeros(W.shape[1], self.dtype)
            out[name] = np.concatenate([a @ W, b[None]])
        return out


def _with_constant(labels, kinds, terms, constant, label, kind):
    """Append a constant (d,) term, the same at every token, to (C, n, d) terms where it is not None."""
    if constant is None:
        return labels, kinds, terms
    block = np.broadcast_to(constant, terms.shape[1:])[None]
    return labels + [label], kinds + [kind], np.concatenate([terms, block])


def _edges(ds, seq, dtype, patterns=True) -> SequenceEdges:
    return ds if isinstance(ds, SequenceEdges) else SequenceEdges(ds, seq, dtype=dtype, patterns=patterns)


def _side_coords(ctx: SequenceEdges, dim: str, positions) -> dict:
    coords = {f"{dim}_pos": (dim, ctx.pos[positions]), f"{dim}_token_id": (dim, ctx.ids[positions])}
    if ctx.text is not None:
        coords[f"{dim}_text"] = (dim, np.asarray(ctx.text)[positions])
    return coords


def ov_edges(ds: xr.Dataset, seq: int, layer: int, head: int, query: int, *, direction=None,
             dtype=np.float64) -> xr.DataArray:
    """What head (``layer``, ``head``) moved to ``query``: its output there as a sum over every upstream term
    at every source position.

    Exact: with the pattern and the attention's input norm frozen, the output is
    sum_j A[query, j] (N_j(x_j) W_V + b_V) W_O and x_j is the sum of the terms written before the layer;
    the sum of the result over (component, source) is the head's output (``head_output``) within the
    store's residual tolerance (``st.tolerance``).

    Parameters
    ----------
    ds : xarray.Dataset
        A store captured with ``patterns=True``.
    seq, layer, head, query : int
        The stored sequence, the head, and the query's position in the sequence (negative: from its end).
    direction : array (d_model,), optional
        Measure each contribution along this direction (a scalar per edge) instead of giving d_model vectors.
    dtype : numpy dtype

    Returns
    -------
    xarray.DataArray
        ``ov_edge`` (component, source[, d_model]): ``component`` is decompose's labels (with ``kind``) plus
        ``L3_attn_norm_beta`` and ``L3H2_b_V`` (the value bias, read through the pattern); ``source``
        carries ``source_pos``, ``source_token_id``, ``source_text``. Attribute ``pattern``: A[query, :].
        Attribute ``error_scale``: the magnitude the model's own rounding acts on (the second invariant's
        ``output_scale`` with the head's messages v_j W_O as values); |sum - output| / error_scale is
        bounded by ``st.tolerance``, in half precision too, where the relative error of a large-score head
        is not (the recomputed pattern carries the scores' rounding).

    Raises
    ------
    PatternsMissingError
        The store has no patterns (``--patterns``).
    StreamtapError
        seq, layer, head or query out of range; ``EdgeError`` where the model clips q/k/v.
    """
    ctx = _edges(ds, seq, dtype)
    ctx.check(layer, head)
    i = ctx.position(query)
    labels, kinds, contrib = ctx.ov(int(layer), int(head), i, direction)
    dims = ("component", "source") + (("d_model",) if direction is None else ())
    coords = {"component": labels, "kind": ("component", kinds), "source": np.arange(ctx.n),
              **_side_coords(ctx, "source", slice(None))}
    return xr.DataArray(contrib, dims=dims, coords=coords, name="ov_edge", attrs={
        "seq": ctx.seq, "layer": int(layer), "head": int(head), "query": i, "pattern": ctx.pattern(layer, head)[i],
        "error_scale": ctx.ov_scale(int(layer), int(head), i),
        "note": "sum over (component, source) is the head's output at the query; pattern and norms frozen"})


def qk_edges(ds: xr.Dataset, seq: int, layer: int, head: int, query: int, key: int, *,
             dtype=np.float64) -> xr.Dataset:
    """Why head (``layer``, ``head``) at ``query`` attended to ``key``: its pre-softmax score as a matrix of
    (query-side term at ``query``) x (key-side term at ``key``) contributions, and its marginals.

    Exact: the score is scale * (R_i q_i) . (R_j k_j) + alibi, bilinear in the terms once the attention's
    input norm and any q/k norm are frozen at their scales (both linear then) and the rotation R of each
    position is applied to every term's query or key; biases, norm betas and ALiBi are pieces of their own.
    ``matrix.sum() + alibi == score``, the model's own score (before a soft-cap, which is not linear: the
    result then decomposes the pre-cap score and says so in ``note``).

    Returns
    -------
    xarray.Dataset
        ``matrix`` (query_term, key_term), ``by_query_term`` and ``by_key_term`` (its marginals), ``alibi``
        and ``score`` (scalars), ``pattern`` (the probability A[query, key]).

    Raises
    ------
    PatternsMissingError
        The store has no patterns (``--patterns``).
    StreamtapError
        Out-of-range arguments; ``EdgeError`` where the model clips q/k/v.
    """
    ctx = _edges(ds, seq, dtype)
    ctx.check(layer, head)
    i, j = ctx.position(query), ctx.position(key)
    ql, qkind, kl, kkind, matrix, alibi, score = ctx.qk(int(layer), int(head), i, j)
    note = "matrix.sum() + alibi == score, the pre-softmax score; input and q/k norms frozen"
    if ctx.att.softcap:
        note += (f"; the model soft-caps scores (cap * tanh(score / cap), cap = {ctx.att.softcap:g}): this is the "
                 "score before the cap, the part that is linear in the terms")
    coords = {"query_term": ql, "query_kind": ("query_term", qkind), "key_term": kl, "key_kind": ("key_term", kkind)}
    m = xr.DataArray(matrix, dims=("query_term", "key_term"))
    return xr.Dataset({"matrix": m, "by_query_term": m.sum("key_term"), "by_key_term": m.sum("query_term"),
                       "alibi": alibi, "score": score, "pattern": float(ctx.pattern(layer, head)[i, j])},
                      coords=coords, attrs={"seq": ctx.seq, "layer": int(layer), "head": int(head), "query": i,
                                            "key": j, "note": note})


def mlp_edges(ds: xr.Dataset, seq: int, layer: int, position: int, *, neurons=None, dtype=np.float64) -> xr.Dataset:
    """What drove each neuron of the MLP at ``layer`` at ``position``: its pre-activation (the up projection's,
    and the gate's in a gated MLP) as a sum over the terms of the residual the MLP reads.

    Exact: pre = N(x) W_in + b_in with N the MLP's input norm frozen at the token's scale, x the sum of the
    terms written before the MLP reads. The activation function is not linear: a neuron is a node whose
    inputs are these exact contributions and whose output is the stored activation ``act`` (act(gate) * up
    for a gated MLP).

    Parameters
    ----------
    ds : xarray.Dataset
        A store captured with ``neurons=True`` (it keeps W_in, W_gate and the MLP's input norm).
    seq, layer, position : int
    neurons : sequence of int, optional
        Which neurons (default all).

    Returns
    -------
    xarray.Dataset
        ``up`` (component, neuron) and, for gated MLPs, ``gate``; ``act`` (neuron), the stored activation.

    Raises
    ------
    MissingWeightsError
        The store has no W_in (capture with ``neurons=True``; MoE and hybrid MLPs do not declare them).
    """
    require(ds, "W_in", "neuron_act")
    ctx = _edges(ds, seq, dtype, patterns=False)
    ctx.check(layer)
    i = ctx.position(position)
    out = ctx.mlp(int(layer), i, neurons)
    sel = np.arange(ds.sizes["neuron"]) if neurons is None else np.asarray(neurons, int)
    coords = {"component": out["labels"], "kind": ("component", out["kinds"]), "neuron": sel}
    data = {"up": (("component", "neuron"), out["in"])}
    if out["gate"] is not None:
        data["gate"] = (("component", "neuron"), out["gate"])
    act = np.asarray(local(ctx.sub["neuron_act"].isel(token=i, layer=int(layer))).values, dtype)[sel]
    data["act"] = ("neuron", act)
    return xr.Dataset(data, coords=coords, attrs={
        "seq": ctx.seq, "layer": int(layer), "position": i, "activation": ds.attrs.get("mlp_act", "unknown"),
        "note": "sum over component of up (gate) is the neuron's pre-activation; act is the stored activation "
                "(not linear in the pre-activation)"})


__all__ = ["EdgeError", "SequenceEdges", "mlp_edges", "ov_edges", "qk_edges"]
