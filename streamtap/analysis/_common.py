"""Plumbing shared by the analyses: token-chunked blockwise maps, the final norm, weights, vocabulary text.

Every per-token analysis is one ``dask.array.blockwise`` over the store's token chunks: each task
reads one chunk of the per-token variables it needs (plus the few static weights it needs, passed as
single-chunk dask arrays so that a distributed scheduler ships them once per worker, not once per
task) and returns a small per-token result. Memory is bounded by the chunk size, whatever the number
of tokens; ``st.open(path, chunks={"token": N})`` picks N.
"""

from __future__ import annotations

import functools
import inspect
import json

import dask.array as da
import numpy as np
import xarray as xr

from ..errors import StreamtapError

# one letter per dimension name, so that blockwise indices follow the dataset's own dims
LETTERS = {"token": "t", "layer": "l", "head": "h", "kv_head": "k", "d_head": "e", "d_model": "m",
           "neuron": "n", "vocab": "v", "sel": "s", "row": "r", "depth": "p",
           "d_head2": "f", "two": "g"}
VOCAB_BLOCK_BYTES = 32 << 20   # rows x vocab logits computed at once inside a task


class MissingWeightsError(StreamtapError):
    """The store lacks a static weight that an analysis needs; the message names it."""


def float_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"analyses compute in a float dtype, got {dtype}")
    return dtype


def single_token(func):
    """Let an analysis take ``ds.isel(token=i)`` (no token dim) and drop the dim from its result."""

    @functools.wraps(func)
    def wrapper(ds, *args, **kwargs):
        from ..dataset import with_token_dim  # here, not at import: workers unpickling blocks skip torch

        ds, squeezed = with_token_dim(ds)
        out = func(ds, *args, **kwargs)
        return out.isel(token=0) if squeezed else out

    return wrapper


def token_chunks(ds: xr.Dataset) -> tuple[int, ...]:
    data = ds["resid_final"].data
    if isinstance(data, da.Array):
        return data.chunks[0]
    return (ds.sizes["token"],)


def token_coords(ds: xr.Dataset) -> dict:
    """The per-token coordinates (seq, pos, token_id, text) to label per-token results with."""
    return {name: c.drop_encoding() for name, c in ds.coords.items() if c.dims == ("token",)}


def per_token(ds: xr.Dataset, name: str, chunks=None) -> xr.DataArray:
    """A per-token variable as dask, chunked along token like resid_final and whole along other dims."""
    var = ds[name]
    chunks = chunks or token_chunks(ds)
    data = var.data if isinstance(var.data, da.Array) else da.from_array(np.asarray(var.data), chunks=-1)
    spec = {i: (chunks if dim == "token" else -1) for i, dim in enumerate(var.dims)}
    return var.copy(data=data.rechunk(spec))


def static(ds: xr.Dataset, name: str, dtype=np.float32) -> np.ndarray:
    """A static weight, read here (weights are small next to the per-token data).

    Read in this process, not through whatever scheduler is active: a round trip to a cluster for
    a few megabytes of weights costs more than reading them.
    """
    require(ds, name)
    return np.asarray(local(ds[stored_name(ds, name)]).values, dtype=dtype)


def local(x):
    """Compute a small lazy object in this process (the synchronous scheduler)."""
    return x.compute(scheduler="sync") if hasattr(x, "compute") else x


def static_dask(ds: xr.Dataset, name: str, dtype=np.float32) -> xr.DataArray:
    """A static weight as one dask chunk: one graph key, shipped once to each worker."""
    require(ds, name)
    var = ds[stored_name(ds, name)]
    data = var.data if isinstance(var.data, da.Array) else da.from_array(np.asarray(var.data), chunks=-1)
    return var.copy(data=data.astype(dtype).rechunk(-1))


def as_static_dask(array: np.ndarray, dims: tuple[str, ...]) -> xr.DataArray:
    return xr.DataArray(da.from_array(array, chunks=-1), dims=dims)


def stored_name(ds: xr.Dataset, name: str) -> str:
    """The variable that holds ``name``: itself, or the one it is stored as.

    A store keeps W_E once where it equals W_U bit for bit (tied, unscaled embeddings) and says so
    with the attribute ``W_E_alias = "W_U"``; stores from before W_E was kept fall back to W_U where
    their embeddings are tied.
    """
    if name in ds:
        return name
    alias = ds.attrs.get(f"{name}_alias")
    if alias is None and name == "W_E" and ds.attrs.get("tied_embeddings"):
        alias = "W_U"
    return alias if alias is not None and alias in ds else name


def require(ds: xr.Dataset, *names: str) -> None:
    missing = [n for n in names if stored_name(ds, n) not in ds]
    if missing:
        raise MissingWeightsError(
            f"this store has no {', '.join(missing)}; the analysis needs it. "
            + _WHY.get(missing[0], "Capture again with a streamtap that stores it."))


_WHY = {
    "W_U": "Capture from a model with an LM head (the unembedding is stored with it).",
    "neuron_act": "Capture with neurons=True (--neurons) to store neuron activations and W_out.",
    "W_out": "Capture with neurons=True (--neurons) to store neuron activations and W_out.",
    "W_Q": "Stores carry the query/key/value weights (W_Q, W_K, W_V) where the layout locates them; "
           "this one predates that or its layout does not say where they are: capture again with this "
           "streamtap, or complete it with ds.assign(W_Q=..., W_K=..., W_V=...).",
    "W_E": "Stores carry the token embedding W_E (or say it is W_U); capture again with this streamtap, "
           "or complete this one with ds.assign(W_E=...).",
}
_WHY["W_K"] = _WHY["W_V"] = _WHY["W_Q"]


def tokens_map(func, out_dims: tuple[str, ...], sizes: dict, per_tok: dict, statics: dict | None = None,
               *, dtype=np.float32, **kwargs) -> da.Array:
    """``func(blocks: dict[name, ndarray], **kwargs)`` over the token chunks of ``per_tok``.

    ``per_tok`` and ``statics`` map names to DataArrays; blockwise indices come from their dims, so
    equal dims must have equal sizes. ``out_dims`` starts with ``token``; the others are new axes
    of sizes ``sizes``. Returns a dask array chunked along token like the inputs.
    """
    statics = statics or {}
    names, args = [], []
    new_letters = iter(c for c in "wxyzabcdfgijoqu" if c not in LETTERS.values())
    out_letters = {}
    for dim in out_dims[1:]:
        out_letters[dim] = next(new_letters)
    for name, arr in {**per_tok, **statics}.items():
        names.append(name)
        args += [arr.data, "".join(LETTERS[d] for d in arr.dims)]
    out_ind = "t" + "".join(out_letters[d] for d in out_dims[1:])

    def call(*blocks, **kw):
        return func(dict(zip(names, blocks)), **kw)

    return da.blockwise(call, out_ind, *args, new_axes={out_letters[d]: sizes[d] for d in out_dims[1:]},
                        dtype=dtype, concatenate=True, **kwargs)


# -- the final norm, frozen per token ------------------------------------------------------------------
def norm_params(ds: xr.Dataset, dtype=np.float32) -> dict:
    """The final norm as plain numbers: kind, eps, gamma (and beta where it has one)."""
    kind = ds.attrs["final_norm_kind"]
    return {
        "center": kind == "layernorm",
        "eps": float(ds.attrs["final_norm_eps"]),
        "gamma": static(ds, "final_norm_weight", dtype),
        "beta": static(ds, "final_norm_bias", dtype) if "final_norm_bias" in ds else None,
    }


def norm_scale_np(x: np.ndarray, center: bool, eps: float) -> np.ndarray:
    """Per-row scale s of N(x) = gamma (x - mean) s + beta, over the last axis."""
    if center:
        var = ((x - x.mean(-1, keepdims=True)) ** 2).mean(-1)
    else:
        var = (x ** 2).mean(-1)
    return 1.0 / np.sqrt(var + eps)


def apply_norm_np(x: np.ndarray, p: dict) -> np.ndarray:
    s = norm_scale_np(x, p["center"], p["eps"])[..., None]
    y = (x - x.mean(-1, keepdims=True)) if p["center"] else x
    y = y * s * p["gamma"]
    return y + p["beta"] if p["beta"] is not None else y


def fold_direction(u: np.ndarray, p: dict) -> np.ndarray:
    """w with s * (x . w) = the direct effect of a residual term x on ``u . N(x_total)`` (beta aside).

    gamma is folded in; for a LayerNorm the centring is too: (x - mean x) . v = x . (v - mean v).
    """
    w = u * p["gamma"]
    return w - w.mean(-1, keepdims=True) if p["center"] else w


def topk_rows(x: np.ndarray, k: int, largest: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest (or smallest) entries of each row, sorted."""
    k = min(k, x.shape[-1])
    y = x if largest else -x
    idx = np.argpartition(-y, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(y, idx, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    idx = np.take_along_axis(idx, order, -1)
    return idx, np.take_along_axis(x, idx, -1)


def vocab_rows_step(vocab: int) -> int:
    return int(max(1, VOCAB_BLOCK_BYTES // (vocab * 8)))


# -- weights the analyses read ------------------------------------------------------------------------
def embedding_matrix(ds: xr.Dataset) -> xr.DataArray:
    """W_E (vocab, d_model): each token's embedding term; stored, or W_U where the two are equal."""
    require(ds, "W_E")
    return ds[stored_name(ds, "W_E")]


def kv_heads(ds: xr.Dataset) -> np.ndarray:
    """For each query head, its key/value head (grouped-query attention repeats each kv head)."""
    n_heads = ds.sizes["head"]
    n_kv = ds.sizes["kv_head"] if "kv_head" in ds.dims else n_heads
    if n_heads % n_kv:
        raise StreamtapError(f"{n_heads} query heads do not divide among {n_kv} key/value heads")
    return np.arange(n_heads) // (n_heads // n_kv)


def per_query_head(ds: xr.Dataset, name: str, dtype=np.float32) -> np.ndarray:
    """W_K or W_V as (layer, head, d_model, d_head): each query head gets its kv head's weight."""
    w = static(ds, name, dtype)
    if "kv_head" in ds[name].dims:
        w = w[:, kv_heads(ds)]
    return w


def model_config(ds: xr.Dataset) -> dict:
    try:
        return json.loads(ds.attrs.get("model_config", "{}"))
    except (TypeError, ValueError):
        return {}


def logit_softcap(ds: xr.Dataset) -> float | None:
    """The model's final logit soft-capping (Gemma-2: logits = cap * tanh(logits / cap)), if any."""
    cap = model_config(ds).get("final_logit_softcapping")
    return float(cap) if cap else None


def is_rotary(ds: xr.Dataset) -> bool:
    """Whether the model rotates queries and keys by position (RoPE), from the stored config."""
    if "positional" in ds.attrs:
        return ds.attrs["positional"] == "rotary"
    if "pos_embed" in ds:
        return False
    text = json.dumps(model_config(ds)).lower()
    return "rope" in text or "rotary" in text


# -- vocabulary text -------------------------------------------------------------------------------
def vocab_text(ds: xr.Dataset, ids, tokenizer=None) -> np.ndarray:
    """Text of vocabulary ids: from a tokenizer, else the store's ``vocab_text``, else the stored corpus.

    Ids that none of these know read ``<id>``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    flat = ids.reshape(-1)
    if tokenizer is not None:
        out = np.array([tokenizer.decode([int(i)]) for i in flat], dtype=object)
        return out.reshape(ids.shape)
    known = corpus_vocab(ds)
    out = np.array([known.get(int(i), f"<{int(i)}>") for i in flat], dtype=object)
    return out.reshape(ids.shape)


def corpus_vocab(ds: xr.Dataset) -> dict[int, str]:
    """id -> text for the ids the store knows: ``vocab_text`` if stored, else those in the corpus."""
    if "vocab_text" in ds:
        return {i: str(t) for i, t in enumerate(ds["vocab_text"].values)}
    if "text" not in ds.coords or "token" not in ds.dims or ds.sizes["token"] == 0:
        return {}
    ids = np.asarray(local(ds["token_id"]).values)
    uniq, first = np.unique(ids, return_index=True)
    texts = local(ds["text"].isel(token=first)).values
    return {int(i): str(t) for i, t in zip(uniq, texts)}


def token_ids(ds: xr.Dataset, words, tokenizer=None) -> list[int]:
    """Vocabulary ids of token strings (e.g. ``" Paris"``): exact single-token matches."""
    ids = []
    known = None
    for w in words:
        if isinstance(w, (int, np.integer)):
            ids.append(int(w))
            continue
        if tokenizer is not None:
            enc = tokenizer(w, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                raise StreamtapError(f"{w!r} is {len(enc)} tokens for this tokenizer; give single tokens")
            ids.append(int(enc[0]))
            continue
        if known is None:
            known = {t: i for i, t in sorted(corpus_vocab(ds).items(), reverse=True)}
        if w not in known:
            raise StreamtapError(f"token {w!r} is not in the store's vocabulary text; pass a tokenizer or an id")
        ids.append(known[w])
    return ids


# -- is the fast (pre-norm) path exact for this store? ----------------------------------------------------
def prenorm_components(ds: xr.Dataset, neurons: bool = False) -> list[tuple]:
    """(label, kind, layer, head, neuron) of the terms of a pre-norm decoder, in decompose's order."""
    out = [("embed", "embed", -1, -1, -1)]
    if "pos_embed" in ds:
        out.append(("pos_embed", "pos_embed", -1, -1, -1))
    for layer in range(ds.sizes["layer"]):
        out += [(f"L{layer}H{h}", "head", layer, h, -1) for h in range(ds.sizes["head"])]
        out.append((f"L{layer}_attn_bias", "attn_bias", layer, -1, -1))
        if neurons:
            out += [(f"L{layer}N{n}", "neuron", layer, -1, n) for n in range(ds.sizes["neuron"])]
            out.append((f"L{layer}_mlp_bias", "mlp_bias", layer, -1, -1))
        else:
            out.append((f"L{layer}_mlp", "mlp", layer, -1, -1))
    return out


def component_coords(labels: list[tuple]) -> dict:
    label, kind, layer, head, neuron = (np.array(x) for x in zip(*labels))
    return {"component": label, "kind": ("component", kind), "layer": ("component", layer.astype(np.int32)),
            "head": ("component", head.astype(np.int32)), "neuron": ("component", neuron.astype(np.int32))}


def prenorm_terms_np(ds: xr.Dataset, dtype=np.float64) -> np.ndarray:
    """The pre-norm terms of a (small) dataset, computed: (component, token, d_model)."""
    embed = np.asarray(ds["embed"].values, dtype)
    rows = [embed]
    if "pos_embed" in ds:
        rows.append(np.asarray(ds["pos_embed"].values, dtype))
    z, W_O = np.asarray(ds["z"].values, dtype), static(ds, "W_O", dtype)
    b_O, mlp = static(ds, "attn_bias", dtype), np.asarray(ds["mlp_out"].values, dtype)
    msgs = np.einsum("tlhe,lhem->lhtm", z, W_O)
    for layer in range(ds.sizes["layer"]):
        rows += list(msgs[layer])
        rows.append(np.broadcast_to(b_O[layer], embed.shape))
        rows.append(mlp[:, layer])
    return np.stack(rows)


def _prenorm_events(events: list[dict], n_layers: int) -> bool:
    """Embeddings, then attention and MLP of each layer in turn, written straight into the stream."""
    want = [("embed", "embed")]
    got = [(e.get("op"), e.get("var")) for e in events if e.get("op") == "embed"]
    if got not in (want, want + [("embed", "pos_embed")]):
        return False
    rest = [e for e in events if e.get("op") != "embed"]
    if len(rest) != 2 * n_layers or len(events) != len(got) + len(rest) or events[:len(got)] != [
            e for e in events if e.get("op") == "embed"]:
        return False
    for i, e in enumerate(rest):
        op = "attn" if i % 2 == 0 else "mlp"
        extra = set(e) - {"op", "layer", "norm"}
        if e.get("op") != op or e.get("layer") != i // 2 or e.get("norm") is not None or extra:
            return False
    return True


def decompose_has_upto() -> bool:
    from ..invariant import decompose

    return "upto" in inspect.signature(decompose).parameters


def prenorm_exact(ds: xr.Dataset) -> bool:
    """Whether this store's terms are the pre-norm ones, checked on its first token against decompose.

    The fast paths (folding directions into W_O, summing layer writes) assume a pre-norm decoder,
    which is all the core supported when they were written. When decompose learns other term models
    (post-norm, in-stream norms), a store of that kind fails this probe and the analyses fall back to
    decompose itself, which is exact by construction.
    """
    from ..invariant import decompose

    if "stream" in ds.attrs:  # the order in which terms entered the stream, written at capture
        return _prenorm_events(json.loads(ds.attrs["stream"]), ds.sizes["layer"])
    if not decompose_has_upto():
        return True  # the core decomposes pre-norm decoders only
    if ds.sizes.get("token", 0) == 0:
        return True
    probe = local(ds.isel(token=slice(0, 1)))
    ref = local(decompose(probe, dtype=np.float64))
    mine = prenorm_components(ds)
    if list(ref.component.values) != [m[0] for m in mine]:
        return False
    got = prenorm_terms_np(probe)
    want = np.asarray(ref.values, dtype=np.float64)
    scale = max(float(np.abs(want).max()), 1e-30)
    return bool(np.abs(got - want).max() <= 1e-5 * scale)


def vocab_scan(rows: np.ndarray, W_U: np.ndarray, b_U, k: int, *, targets=None, bottom: bool = False,
               probs: bool = True, softcap: float | None = None) -> dict:
    """Logits of each row against the whole vocabulary, reduced to what the analyses keep.

    ``rows`` (R, d) are already what multiplies W_U (normed residuals, or folded directions).
    Returns top-k ids/logits (and probabilities of a softmax over the whole vocabulary), optionally
    bottom-k, and for ``targets`` (R,) their logit, probability and rank (0 = top). ``softcap``
    applies the model's final logit soft-capping (cap * tanh(logit / cap)). Works through the
    rows in slices, so no more than ~32 MB of logits exist at once.
    """
    R, V = rows.shape[0], W_U.shape[0]
    k = min(k, V)
    out = {"top_id": np.empty((R, k), np.int64), "top_logit": np.empty((R, k), rows.dtype)}
    if probs:
        out["top_prob"] = np.empty((R, k), rows.dtype)
    if bottom:
        out["bottom_id"] = np.empty((R, k), np.int64)
        out["bottom_logit"] = np.empty((R, k), rows.dtype)
    if targets is not None:
        for name in ("target_logit", "target_prob"):
            out[name] = np.empty(R, rows.dtype)
        out["target_rank"] = np.empty(R, np.int64)
    step = vocab_rows_step(V)
    for start in range(0, R, step):
        sl = slice(start, start + step)
        logits = rows[sl] @ W_U.T
        if b_U is not None:
            logits += b_U
        if softcap:
            logits = softcap * np.tanh(logits / softcap)
        idx, val = topk_rows(logits, k)
        out["top_id"][sl], out["top_logit"][sl] = idx, val
        if probs or targets is not None:
            mx = logits.max(-1, keepdims=True)
            lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(-1))
        if probs:
            out["top_prob"][sl] = np.exp(val - lse[:, None])
        if bottom:
            idx, val = topk_rows(logits, k, largest=False)
            out["bottom_id"][sl], out["bottom_logit"][sl] = idx, val
        if targets is not None:
            t = np.asarray(targets[sl])
            tl = np.take_along_axis(logits, t[:, None], -1)[:, 0]
            out["target_logit"][sl] = tl
            out["target_prob"][sl] = np.exp(tl - lse)
            out["target_rank"][sl] = (logits > tl[:, None]).sum(-1)
    return out


def pack(fields: dict, names: list[str]) -> np.ndarray:
    """Stack same-shaped fields along a last axis in float64 (ids up to 2**53 stay exact)."""
    return np.stack([np.asarray(fields[n], np.float64) for n in names], axis=-1)


def unpack(data, names: list[str], int_fields=()) -> dict:
    return {n: (data[..., i].astype(np.int64) if n in int_fields else data[..., i]) for i, n in enumerate(names)}
