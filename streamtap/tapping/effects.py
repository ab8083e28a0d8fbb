"""Total effects, measured on the live model: ablations, dropped source messages, rank-reduced heads.

A store explains a prediction with patterns and norms frozen (direct effects). What the model loses
when a head is removed, when some source messages never reach the attention (the KV-cache question),
or when a head's fused W_OV / W_QK is truncated to rank r, is a total effect: every later layer reacts.
``effects`` runs each intervention through nnsight on the unmodified model (its public tracing API;
module paths come from the bound layout) and reports the change in next-token loss and the KL from
the clean distribution; with ``store=`` it puts next to it the direct effect the store predicts.

Interventions, each on one head (l, h), act on what the layout locates:

- ``Ablate(l, h, "zero")``: the head's z (its slice of the output projection's input) set to 0;
  ``"mean"``: set to its mean over every real token of the corpus.
- ``DropSources(l, h, keys, renormalize)``: the messages A_ij v_j of the chosen keys j removed from the
  head's output at every query i. ``renormalize=False`` subtracts them (the attention they had is lost,
  as if their values were zero); ``renormalize=True`` divides the rest by their remaining attention
  1 - sum_S A_ij, which is exactly the softmax over the keys that are left: what a KV cache without
  those keys computes. Needs the attention's probabilities (``attn_implementation="eager"``).
- ``RankReduce(l, h, r, "OV")``: W_V W_O replaced by its best rank-r approximation, applied as
  z -> (z - b_V) X + b_V with ``streamtap.analysis.rank.truncation_map`` (the value bias is kept whole);
  ``"QK"``: W_Q W_K^T likewise, on the head's queries before positions are applied (for a rotary
  model this truncates the position-free map; the rotation still acts between the factors).

A list of interventions is applied together and measured as one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import xarray as xr

from ..errors import InputError, StreamtapError
from .sinks import envoy_for, unwrap

HOW = ("zero", "mean")
MATRICES = ("OV", "QK")


@dataclass(frozen=True)
class Ablate:
    """Zero- or mean-ablate head (layer, head): its z replaced by 0 or by its corpus mean."""

    layer: int
    head: int
    how: str = "zero"


@dataclass(frozen=True)
class DropSources:
    """Remove the messages of chosen source tokens from head (layer, head)'s output at every query.

    ``keys``: one boolean array per text (True: drop that position's message), ``"all"``, or a
    function (text index, token ids) -> such an array. ``renormalize``: see the module docstring."""

    layer: int
    head: int
    keys: object = "all"
    renormalize: bool = False


@dataclass(frozen=True)
class RankReduce:
    """Replace head (layer, head)'s fused W_OV (``matrix="OV"``) or W_QK (``"QK"``) by its rank-r truncation."""

    layer: int
    head: int
    rank: int
    matrix: str = "OV"


Intervention = Ablate | DropSources | RankReduce


def label(iv: Intervention) -> str:
    """A short name: ``L3H2 zero``, ``L3H2 drop``, ``L3H2 drop renorm``, ``L3H2 OV r8``."""
    head = f"L{iv.layer}H{iv.head}"
    if isinstance(iv, Ablate):
        return f"{head} {iv.how}"
    if isinstance(iv, DropSources):
        return f"{head} drop" + (" renorm" if iv.renormalize else "")
    return f"{head} {iv.matrix} r{iv.rank}"


def _kind(group: list[Intervention]) -> str:
    kinds = {label(iv).split(" ", 1)[1].split(" r")[0] for iv in group}
    return kinds.pop() if len(kinds) == 1 else "mixed"


def tokenize(texts_or_ids, tokenizer) -> list[np.ndarray]:
    """Each text's token ids (strings through ``tokenizer``, as ``streamtap.capture`` tokenizes them)."""
    out = []
    for i, item in enumerate(texts_or_ids):
        if isinstance(item, str):
            if tokenizer is None:
                raise InputError("texts given as strings need tokenizer=...; or pass lists of token ids")
            item = tokenizer(item)["input_ids"]
        ids = np.asarray(item, dtype=np.int64).reshape(-1)
        if ids.size < 2:
            raise InputError(f"text {i} has {ids.size} token(s); a next-token loss needs at least 2")
        out.append(ids)
    if not out:
        raise InputError("effects needs at least one text")
    return out


def _groups(interventions) -> tuple[list[str], list[list[Intervention]]]:
    if isinstance(interventions, dict):
        items = list(interventions.items())
    else:
        items = [(None, iv) for iv in interventions]
    labels, groups = [], []
    for name, iv in items:
        group = list(iv) if isinstance(iv, (list, tuple)) else [iv]
        if not group or not all(isinstance(g, (Ablate, DropSources, RankReduce)) for g in group):
            raise InputError(f"an intervention must be Ablate, DropSources or RankReduce (or a list of them), "
                             f"got {iv!r}")
        labels.append(name if name is not None else " + ".join(label(g) for g in group))
        groups.append(group)
    if len(set(labels)) != len(labels):
        raise InputError("two interventions have the same label; pass a dict {label: intervention} to name them")
    return labels, groups


def _check(groups, bound, texts) -> None:
    for group in groups:
        for iv in group:
            if not 0 <= iv.layer < bound.n_layers or f"z.{iv.layer}" not in bound.taps:
                raise InputError(f"{label(iv)}: layer {iv.layer} has no attention heads (layers: "
                                 f"{bound.attn_layers[0]}..{bound.attn_layers[-1]})")
            if not 0 <= iv.head < bound.n_heads:
                raise InputError(f"{label(iv)}: head {iv.head} is out of range 0..{bound.n_heads - 1}")
            if isinstance(iv, Ablate) and iv.how not in HOW:
                raise InputError(f"Ablate(how={iv.how!r}): expected one of {HOW}")
            if isinstance(iv, RankReduce):
                if iv.matrix not in MATRICES:
                    raise InputError(f"RankReduce(matrix={iv.matrix!r}): expected one of {MATRICES}")
                if not 0 <= iv.rank <= bound.d_head:
                    raise InputError(f"{label(iv)}: rank must be in 0..d_head={bound.d_head}")
            if isinstance(iv, DropSources):
                if getattr(bound.model.config, "_attn_implementation", None) != "eager":
                    raise InputError("DropSources needs the attention's probabilities, which only eager attention "
                                     "returns: load the model with attn_implementation='eager'")
                for i, ids in enumerate(texts):
                    keys = _keys(iv, i, ids)
                    if keys.shape != ids.shape:
                        raise InputError(f"{label(iv)}: keys for text {i} have shape {keys.shape}, the text has "
                                         f"{ids.size} tokens; give one boolean per token")


def _keys(iv: DropSources, i: int, ids: np.ndarray) -> np.ndarray:
    keys = iv.keys
    if isinstance(keys, str):
        if keys != "all":
            raise InputError(f"DropSources(keys={keys!r}): expected 'all', one boolean array per text or a function")
        return np.ones(ids.shape, bool)
    if callable(keys):
        return np.asarray(keys(i, ids), bool).reshape(-1)
    return np.asarray(keys[i], bool).reshape(-1)


class _Plan:
    """What one forward does, as functions on module values, grouped by (module path, slot) in the
    order the forward produces them (nnsight requires that order)."""

    def __init__(self):
        self.steps: dict[tuple[int, int, str, str], list[Callable]] = {}

    def add(self, layer: int, stage: int, path: str, slot: str, fn: Callable) -> None:
        self.steps.setdefault((layer, stage, path, slot), []).append(fn)

    def ordered(self):
        return [(key[2], key[3], fns) for key, fns in sorted(self.steps.items(), key=lambda kv: kv[0][:2])]


def _apply(envoy, plan: _Plan, output: dict) -> None:
    """Inside a trace: each planned module value read, changed by its functions, written back."""
    for path, slot, fns in plan.ordered():
        module = envoy.get(path)
        value = module.output if slot == "output" else module.input
        changed = False
        for fn in fns:
            new = fn(value)
            if new is not None:
                value, changed = new, True
        if changed:
            if slot == "output":
                module.output = value
            else:
                module.input = value
    output["out"] = envoy.output


class _Builder:
    """Turns interventions into plan steps on one bound model (weights read once, in float64)."""

    def __init__(self, bound, means: dict):
        from ..layouts import Weights

        self.bound, self.means = bound, means
        self.weights = Weights(bound)
        self._attn = None
        self._maps: dict = {}
        n_kv = self.attention()["W_V"].shape[1] if "W_V" in self.attention() else bound.n_heads
        self.kv = np.arange(bound.n_heads) // (bound.n_heads // n_kv)

    def attention(self) -> dict:
        if self._attn is None:
            self._attn = {k: v.double().numpy() for k, v in self.weights.attention_weights().items()}
        return self._attn

    def _require_qkv(self, what: str) -> dict:
        attn = self.attention()
        if "W_V" not in attn:
            raise StreamtapError(f"{what} needs the attention's query/key/value weights, which layout "
                                 f"{self.bound.name!r} does not locate")
        notes = self.weights.attention_info().get("attn_notes", [])
        if notes:
            raise StreamtapError(f"{what} is exact only where q, k and v are linear in the attention's input; "
                                 f"this model also does: {'; '.join(notes)}")
        return attn

    def _map(self, iv, W_a: np.ndarray, W_b: np.ndarray) -> torch.Tensor:
        """A rank-reduction map, computed once per intervention (every batch reuses it), from its head's
        factorisation, made once per head and matrix (every rank of that head reuses it)."""
        from ..analysis.rank import truncation_factors, truncation_map

        if iv not in self._maps:
            head = (iv.matrix, iv.layer, iv.head)
            if head not in self._maps:
                self._maps[head] = truncation_factors(W_a, W_b)
            self._maps[iv] = torch.from_numpy(truncation_map(W_a, W_b, iv.rank, self._maps[head]))
        return self._maps[iv]

    def o_proj(self, layer: int):
        return self.bound.module(self.bound.taps[f"z.{layer}"][0])

    def add(self, plan: _Plan, iv: Intervention, keys: torch.Tensor | None) -> None:
        b, l, h, e = self.bound, iv.layer, iv.head, self.bound.d_head
        zpath = b.taps[f"z.{l}"][0]
        if isinstance(iv, Ablate):
            fill = None if iv.how == "zero" else self.means[(l, h)]

            def ablate(z, fill=fill):
                z = z.clone()
                zh = z.view(*z.shape[:-1], b.n_heads, e)[..., h, :]
                zh.zero_() if fill is None else zh.copy_(fill.to(z))
                return z
            plan.add(l, 2, zpath, "input", ablate)
        elif isinstance(iv, RankReduce) and iv.matrix == "OV":
            attn = self._require_qkv("RankReduce OV")
            if "W_O" not in self._maps:
                self._maps["W_O"] = self.weights.output_projections()[0].double().numpy()
            W_O = self._maps["W_O"][l, h]
            X = self._map(iv, attn["W_V"][l, self.kv[h]], W_O)
            b_V = torch.from_numpy(attn["b_V"][l, self.kv[h]]) if "b_V" in attn else torch.zeros(e, dtype=torch.float64)

            def reduce_ov(z, X=X, b_V=b_V):
                z = z.clone()
                zh = z.view(*z.shape[:-1], b.n_heads, e)[..., h, :]
                zh.copy_(((zh.double() - b_V) @ X + b_V).to(z))
                return z
            plan.add(l, 2, zpath, "input", reduce_ov)
        elif isinstance(iv, RankReduce):
            attn = self._require_qkv("RankReduce QK")
            from ..layouts.weights import projection_columns

            X = self._map(iv, attn["W_Q"][l, h], attn["W_K"][l, self.kv[h]].T)
            b_Q = torch.from_numpy(attn["b_Q"][l, h]) if "b_Q" in attn else torch.zeros(e, dtype=torch.float64)
            qpath, cols = projection_columns(b, l, "q", h)

            def reduce_qk(q, X=X, b_Q=b_Q, cols=cols):
                q = q.clone()
                q[..., cols] = ((q[..., cols].double() - b_Q) @ X + b_Q).to(q)
                return q
            plan.add(l, 0, qpath, "output", reduce_qk)
        else:
            self._drop(plan, iv, keys)

    def _drop(self, plan: _Plan, iv: DropSources, keys: torch.Tensor) -> None:
        from ..layouts.weights import in_out_weight, projection_columns

        b, l, h, e = self.bound, iv.layer, iv.head, self.bound.d_head
        self._require_qkv("DropSources")
        vpath, cols = projection_columns(b, l, "v", int(self.kv[h]))
        W_O = in_out_weight(self.o_proj(l)).reshape(b.n_heads, e, b.d_model)[h]
        seen: dict = {}

        def read_v(v, cols=cols):
            seen["v"] = v[..., cols]

        def read_z(z):
            seen["z"] = z.view(*z.shape[:-1], b.n_heads, e)[..., h, :]

        def drop(out):
            A = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
            if A is None:
                raise StreamtapError("the attention module returned no probabilities; DropSources needs "
                                     "attn_implementation='eager'")
            a = A[:, h].double() * keys.to(A.device)[:, None, :]                       # (B, query, key)
            dropped = torch.einsum("bij,bjd->bid", a, seen["v"].double())
            z = seen["z"].double()
            if iv.renormalize:
                rest = 1 - a.sum(-1, keepdim=True)
                new = torch.where(rest > 1e-5, (z - dropped) / rest.clamp(min=1e-5), torch.zeros_like(z))   # nothing left to read: 0
                delta = new - z
            else:
                delta = -dropped
            return (out[0] + (delta @ W_O.double()).to(out[0]), *tuple(out[1:]))
        plan.add(l, 1, vpath, "output", read_v)
        plan.add(l, 2, b.taps[f"z.{l}"][0], "input", read_z)
        plan.add(l, 3, b.in_block(l, b.attn.module_path, "attention module"), "output", drop)


def _pad(batch: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask: every text keeps positions 0..n-1, as alone."""
    width = max(ids.size for ids in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, t in enumerate(batch):
        ids[row, :t.size] = torch.from_numpy(t)
        mask[row, :t.size] = 1
    return ids.to(device), mask.to(device)


def _forward(envoy, ids: torch.Tensor, mask: torch.Tensor, plan: _Plan) -> np.ndarray:
    """One traced forward with ``plan`` applied; the logits (batch, position, vocab) in float64."""
    output: dict = {}
    with torch.no_grad(), envoy.trace(input_ids=ids, attention_mask=mask):
        _apply(envoy, plan, output)
    out = output["out"]
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.detach().double().cpu().numpy()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def metrics(base: np.ndarray, logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """For one text's logits (position, vocab), clean and changed: the sums of next-token loss
    (over positions 0..n-2), of KL(clean || changed) (over every position) and of the change in the
    next token's logit (over 0..n-2)."""
    n = ids.size
    lb, li = _log_softmax(base[:n]), _log_softmax(logits[:n])
    nxt = ids[1:]
    rows = np.arange(n - 1)
    nll = -li[rows, nxt].sum()
    kl = (np.exp(lb) * (lb - li)).sum()
    dlogit = (logits[rows, nxt] - base[rows, nxt]).sum()
    return np.array([nll, kl, dlogit])


def _means(envoy, bound, batches, heads: set) -> dict:
    """Each wanted head's z averaged over every real token of the corpus (float64)."""
    layers = sorted({layer for layer, _ in heads})
    total = {layer: torch.zeros(bound.n_heads * bound.d_head, dtype=torch.float64) for layer in layers}
    count = 0
    for batch in batches:
        ids, mask = _pad(batch, bound.model.device)
        seen: dict = {}
        with torch.no_grad(), envoy.trace(input_ids=ids, attention_mask=mask):
            for layer in layers:
                seen[layer] = envoy.get(bound.taps[f"z.{layer}"][0]).input
        real = mask.bool()
        for layer in layers:
            total[layer] += seen[layer][real].double().sum(0).cpu()
        count += int(real.sum())
    return {(l, h): (total[l] / count).view(bound.n_heads, bound.d_head)[h] for l, h in heads}


def effects(model, texts_or_ids, interventions, *, tokenizer=None, batch_size: int = 8, store=None) -> xr.Dataset:
    """Total effects of each intervention on next-token loss and on the output distribution, measured
    on the live model, with the store's direct-effect prediction beside them when ``store`` is given.

    Parameters
    ----------
    model : transformers model or nnsight envoy
        A causal LM in eval mode; it is not modified (the interventions live in nnsight traces).
    texts_or_ids : sequence of str or of lists of int
        The corpus; strings need ``tokenizer``.
    interventions : list or dict
        ``Ablate``, ``DropSources``, ``RankReduce`` or lists of them (applied together); a dict names
        them ``{label: intervention}``.
    tokenizer : optional
    batch_size : int
        Texts per forward (right-padded).
    store : xarray.Dataset, optional
        An opened store of the same texts (``streamtap.capture(model, texts, ...)``): adds the direct
        effects (``direct_effects``).

    Returns
    -------
    xarray.Dataset
        Over ``intervention`` (its labels; coordinates ``kind``, ``layer`` and ``head``, -1 for a group
        over several heads): ``loss`` (mean next-token loss, nats), ``delta_loss`` (minus the clean
        loss), ``kl`` (mean KL(clean || changed) per token, nats) and ``delta_logit`` (mean change of
        the next token's logit); with ``store``, ``direct_delta_loss``, ``direct_kl`` and
        ``direct_delta_logit``. Attributes ``loss_clean``, ``n_tokens``, ``n_predicted``.
    """
    from ..layouts import bind, layout_for

    module, envoy = unwrap(model)
    envoy = envoy if envoy is not None else envoy_for(module)
    bound = bind(layout_for(module), module)
    texts = tokenize(texts_or_ids, tokenizer)
    labels, groups = _groups(interventions)
    _check(groups, bound, texts)
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    starts = list(range(0, len(texts), batch_size))
    batches = [texts[s:s + batch_size] for s in starts]
    wanted = {(iv.layer, iv.head) for g in groups for iv in g if isinstance(iv, Ablate) and iv.how == "mean"}
    builder = _Builder(bound, _means(envoy, bound, batches, wanted) if wanted else {})
    sums = np.zeros((len(groups), 3))
    clean = 0.0
    for start, batch in zip(starts, batches):
        ids, mask = _pad(batch, bound.model.device)
        base = _forward(envoy, ids, mask, _Plan())
        clean += sum(metrics(base[r], base[r], t)[0] for r, t in enumerate(batch))
        for g, group in enumerate(groups):
            plan = _Plan()
            for iv in group:
                keys = None
                if isinstance(iv, DropSources):
                    keys = torch.zeros(mask.shape, dtype=torch.float64)
                    for r, t in enumerate(batch):
                        keys[r, :t.size] = torch.from_numpy(_keys(iv, start + r, t).astype(np.float64))
                builder.add(plan, iv, keys)
            logits = _forward(envoy, ids, mask, plan)
            sums[g] += sum(metrics(base[r], logits[r], t) for r, t in enumerate(batch))
    n_tok = sum(t.size for t in texts)
    n_pred = n_tok - len(texts)
    out = _result(labels, groups, sums, clean, n_tok, n_pred)
    if store is not None:
        direct = direct_effects(store, texts, interventions)
        for name in ("delta_loss", "kl", "delta_logit"):
            out[f"direct_{name}"] = direct[name]
    return out


def _result(labels, groups, sums, clean, n_tok, n_pred, prefix="") -> xr.Dataset:
    loss = sums[:, 0] / n_pred
    coords = {"intervention": labels, "kind": ("intervention", [_kind(g) for g in groups]),
              "layer": ("intervention", [g[0].layer if len(g) == 1 else -1 for g in groups]),
              "head": ("intervention", [g[0].head if len(g) == 1 else -1 for g in groups])}
    dims = ("intervention",)
    return xr.Dataset({"loss": (dims, loss), "delta_loss": (dims, loss - clean / n_pred),
                       "kl": (dims, sums[:, 1] / n_tok), "delta_logit": (dims, sums[:, 2] / n_pred)}, coords=coords,
                      attrs={"loss_clean": clean / n_pred, "n_tokens": n_tok, "n_predicted": n_pred,
                             "measured": prefix or "total effects: the live model with the interventions applied"})


def direct_effects(ds: xr.Dataset, texts_or_ids, interventions, *, tokenizer=None) -> xr.Dataset:
    """The direct effect of each intervention, from a store of the same texts: the head's change of
    output added to the final residual, read through the final norm at its frozen scale and W_U,
    nothing downstream recomputed. Same variables as ``effects`` (without ``direct_``).

    Ablations and ``RankReduce(..., "OV")`` change the head's output z W_O directly; a W_QK truncation
    acts only through the pattern, so with patterns frozen its direct effect is 0; ``DropSources``
    gives NaN (its direct effect needs the store's patterns, not computed here).

    Raises
    ------
    StreamtapError
        The store's texts differ from ``texts_or_ids``, or its head outputs pass through norms inside
        the stream (post-LN, post-sublayer norms), where z W_O is not the term that reaches the end.
    """
    from ..analysis._store import final_norm, logit_softcap, per_query_head, static
    from ..analysis.rank import truncation_factors, truncation_map
    from ..attention import sequence_tokens

    texts = tokenize(texts_or_ids, tokenizer)
    labels, groups = _groups(interventions)
    if "norm_weight" in ds:
        raise StreamtapError("direct effects from this store are not available: its head outputs pass through norms "
                             "inside the stream (post-LN or post-sublayer norms), so z W_O is not the term that "
                             "reaches the final residual; measure total effects without store=")
    if "W_U" not in ds:
        raise StreamtapError("this store has no W_U (the model had no LM head); direct effects need it")
    seqs = np.unique(np.asarray(ds["seq"].values))
    if seqs.size != len(texts):
        raise StreamtapError(f"the store holds {seqs.size} sequences, the corpus {len(texts)} texts: capture the same "
                             "texts (streamtap.capture(model, texts, store)) for direct effects")
    rows = [sequence_tokens(ds, s) for s in seqs]
    for i, (r, t) in enumerate(zip(rows, texts)):
        stored = np.asarray(ds["token_id"].isel(token=r).values)
        if not np.array_equal(stored, t):
            raise StreamtapError(f"text {i} is not the store's sequence {seqs[i]} (token ids differ): capture the same "
                                 "texts, in the same order, for direct effects")
    W_O = static(ds, "W_O", np.float64)
    W_U = static(ds, "W_U", np.float64)
    b_U = static(ds, "unembed_bias", np.float64) if "unembed_bias" in ds else 0.0
    norm = final_norm(ds, np.float64)
    cap = logit_softcap(ds)
    z_all = ds["z"]
    heads = {(iv.layer, iv.head) for g in groups for iv in g}
    means = {(l, h): np.asarray(z_all.isel(layer=l, head=h).astype(np.float64).mean("token").values)
             for l, h in heads}
    maps = {}
    ov = [iv for g in groups for iv in g if isinstance(iv, RankReduce) and iv.matrix == "OV"]
    if ov:
        W_V = per_query_head(ds, "W_V", np.float64)
        b_V = per_query_head(ds, "b_V", np.float64) if "b_V" in ds else np.zeros(W_V.shape[:2] + W_V.shape[-1:])
        factors = {}
        for iv in ov:
            W_a, W_b = W_V[iv.layer, iv.head], W_O[iv.layer, iv.head]
            if (iv.layer, iv.head) not in factors:   # one factorisation per head, whatever ranks are asked
                factors[(iv.layer, iv.head)] = truncation_factors(W_a, W_b)
            maps[iv] = (truncation_map(W_a, W_b, iv.rank, factors[(iv.layer, iv.head)]), b_V[iv.layer, iv.head])

    def logits_of(x, s):
        centred = x - x.mean(-1, keepdims=True) if norm.center else x
        y = (centred * s[:, None] * norm.gamma + (norm.beta if norm.beta is not None else 0)) @ W_U.T + b_U
        return cap * np.tanh(y / cap) if cap else y

    sums, clean = np.zeros((len(groups), 3)), 0.0
    for r, t in zip(rows, texts):
        seq = ds.isel(token=r)
        resid = np.asarray(seq["resid_final"].values, np.float64)
        z = np.asarray(seq["z"].values, np.float64)                       # (T, layer, head, d_head)
        s = norm.scale(resid)
        base = logits_of(resid, s)
        clean += metrics(base, base, t)[0]
        for gi, g in enumerate(groups):
            if any(isinstance(iv, DropSources) for iv in g):
                sums[gi] = np.nan
                continue
            delta = np.zeros_like(resid)
            for iv in g:
                zh = z[:, iv.layer, iv.head]
                if isinstance(iv, Ablate):
                    new = np.zeros_like(zh) if iv.how == "zero" else np.broadcast_to(means[(iv.layer, iv.head)], zh.shape)
                elif iv.matrix == "OV":
                    X, b_V = maps[iv]
                    new = (zh - b_V) @ X + b_V
                else:
                    continue
                delta += (new - zh) @ W_O[iv.layer, iv.head]
            sums[gi] += metrics(base, logits_of(resid + delta, s), t)
    n_tok = sum(t.size for t in texts)
    return _result(labels, groups, sums, clean, n_tok, n_tok - len(texts),
                   prefix="direct effects: the head's output change at the final residual, final norm scale frozen")


__all__ = ["Ablate", "DropSources", "RankReduce", "effects", "direct_effects", "label", "metrics"]
