"""Empty messages as first described: a source token whose message through a head carries nothing.

Every token j sends each head a **source message** m[j] = v_j W_O (``source_messages``), read by any
later query that attends to it. Some tokens send almost nothing through some heads; the seed found such
messages resembling the most or the least frequent tokens of the vocabulary and asked whether they are
no-ops a KV cache could drop (docs/analysis.md, "Empty messages"). Per (token, layer, head) this gives:

- ``relative_norm``: |m[j]| over the head's typical message, the geometric mean of |m| over the
  stored tokens that are not first in their sequence. The first token's residual is orders of magnitude
  larger than the others' (the attention sink), so it is measured but kept out of the typical norm and
  apart in ``empty_message_summary``;
- ``cos_frequent`` / ``cos_rare``: the cosine of m[j] with the mean unit embedding of the ``n_tokens``
  most / least frequent tokens;
- the **controls**: ``cos_random``, the same with ``n_tokens`` vocabulary tokens drawn at random (a mean
  of unit embeddings leans toward the embedding's common direction whatever the tokens, so this is what
  "resembles frequent tokens" must beat), and ``cos_isotropic``, with a random direction of model space.

Everything comes from v (d_head) through small per-head matrices (W_O W_O^T, W_O u): no message of
d_model is materialised. The query-side norm |head output| / |residual| that earlier versions called an
"empty message" measured something else (how much a head writes at a query, whichever sources it read);
it is ``head_output`` and is not repeated here.
"""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import xarray as xr

from ._blocks import as_static_dask, float_dtype, pack, single_token, token_coords, tokens_map, unpack
from ._store import embedding_matrix, local, require

FIELDS = ["norm", "cos_frequent", "cos_rare", "cos_random", "cos_isotropic"]
DIRECTIONS = ["frequent", "rare", "random", "isotropic"]
NEAR_EMPTY = 0.1   # near-empty: |message| below a tenth of the head's typical message


def token_frequencies(ds: xr.Dataset) -> xr.DataArray:
    """How often each vocabulary id occurs among the stored tokens, computed: ``count`` over ``vocab``
    (the store's vocabulary size where it has a ``vocab`` dim, else the largest stored id + 1)."""
    ids = ds["token_id"].data
    ids = ids if isinstance(ids, da.Array) else da.from_array(np.asarray(ids))
    n_vocab = ds.sizes["vocab"] if "vocab" in ds.dims else int(ids.max().compute()) + 1
    counts = da.bincount(ids.astype(np.int64), minlength=n_vocab).compute()[:n_vocab]
    return xr.DataArray(counts, dims=("vocab",), name="count")


def merge_ranks(tokenizer, n_vocab: int | None = None) -> xr.DataArray:
    """Each vocabulary id's BPE merge rank from a Hugging Face fast tokenizer: ``merge_rank`` over
    ``vocab``, NaN for tokens no merge makes (the byte alphabet, special tokens).

    BPE learns merges most frequent pair first, so a low rank is a frequent token of the tokenizer's
    training corpus; ``empty_messages(ds, frequency=merge_ranks(tok))`` uses it instead of counting.
    """
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE" or "merges" not in model:
        raise ValueError(f"merge ranks need a BPE tokenizer; this one is {model.get('type')!r}: count a corpus "
                         "instead (frequency='corpus' or token_frequencies(a store of that corpus))")
    vocab = model["vocab"]
    n_vocab = n_vocab or max(max(vocab.values()) + 1, len(tokenizer))
    ranks = np.full(n_vocab, np.nan)
    for rank, merge in enumerate(model["merges"]):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = vocab.get(left + right)
        if i is not None and i < n_vocab and np.isnan(ranks[i]):
            ranks[i] = rank
    return xr.DataArray(ranks, dims=("vocab",), name="merge_rank")


def frequency_extremes(ds: xr.Dataset, n: int = 10, frequency="corpus") -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` most and the ``n`` least frequent vocabulary ids.

    ``frequency`` is ``"corpus"`` (count the store's own tokens), counts over ``vocab`` (an array or
    ``token_frequencies`` of another store), or ``merge_ranks(tokenizer)`` (low rank = frequent). With
    counts, only ids that occur are candidates; with ranks, only ranked ids. Ties go to the smaller id.
    Where fewer than ``2 n`` ids are candidates, each set has half of them, so the two never overlap.
    """
    if isinstance(frequency, str):
        if frequency != "corpus":
            raise ValueError(f"frequency must be 'corpus', counts over the vocabulary or merge_ranks(tokenizer), "
                             f"got {frequency!r}")
        frequency = token_frequencies(ds)
    ranked = getattr(frequency, "name", None) == "merge_rank"
    values = np.asarray(getattr(frequency, "values", frequency), np.float64)
    key = values if ranked else -values                       # ascending key = most frequent first
    seen = np.flatnonzero(np.isfinite(values) if ranked else values > 0)
    if seen.size < 2:
        raise ValueError(f"only {seen.size} token has a frequency; frequent and rare tokens need at least two: "
                         "count a larger corpus")
    n = min(n, seen.size // 2)          # the two sets never overlap
    most = seen[np.lexsort((seen, key[seen]))[:n]]
    rare = seen[np.lexsort((seen, -key[seen]))[:n]]
    return most, rare


def _unit_mean(E: np.ndarray, ids: np.ndarray) -> np.ndarray:
    unit = E[ids] / np.maximum(np.linalg.norm(E[ids], axis=-1, keepdims=True), 1e-30)
    v = unit.mean(0)
    return v / max(np.linalg.norm(v), 1e-30)


@single_token
def empty_messages(ds: xr.Dataset, *, layers=None, n_tokens: int = 10, frequency="corpus", seed: int = 0,
                   dtype=np.float32) -> xr.Dataset:
    """Every source message's size and resemblance to frequent and rare tokens, with controls: lazy
    Dataset (token, layer, head).

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store (any: patterns are not needed) or a selection of its tokens.
    layers : int or sequence of int, optional
        Which (default: all).
    n_tokens : int
        How many of the most and least frequent tokens (and of the random control tokens) make each
        direction.
    frequency : "corpus", counts or merge ranks over vocab
        Where token frequency comes from (``frequency_extremes``); default: the store's own tokens.
    seed : int
        The random control's seed.
    dtype : numpy dtype

    Returns
    -------
    xarray.Dataset
        Over (token, layer, head): ``norm``, ``relative_norm``, ``cos_frequent``, ``cos_rare``,
        ``cos_random``, ``cos_isotropic`` (0 for a zero message) and a ``first`` coordinate (the token
        is first in its sequence). ``typical_norm`` over (layer, head). Attributes list the ids behind
        each direction.

    Raises
    ------
    MissingWeightsError
        The store has no W_V or no token embedding.
    """
    from ..attention import Attention
    from .decomposition import residual_stream
    from .patterns import _check_index

    require(ds, "W_V")
    dtype = float_dtype(dtype)
    layers = _check_index("layer", layers, ds.sizes["layer"])
    most, rare = frequency_extremes(ds, n_tokens, frequency)
    E = np.asarray(local(embedding_matrix(ds)).values, np.float64)
    rng = np.random.default_rng(seed)
    random_ids = np.sort(rng.choice(E.shape[0], size=len(most), replace=False))
    iso = rng.standard_normal(E.shape[1])
    directions = np.stack([_unit_mean(E, most), _unit_mean(E, rare), _unit_mean(E, random_ids),
                           iso / np.linalg.norm(iso)])                                  # (4, d_model)
    att = Attention(ds, np.float64)
    W_O = att.W_O[layers]                                                               # (sel, H, e, m)
    gram = np.einsum("lhem,lhfm->lhef", W_O, W_O)
    proj = np.einsum("lhem,dm->lhed", W_O, directions)
    stream = residual_stream(ds, depths=[(int(layer), "attn") for layer in layers], dtype=dtype)
    statics = {"gram": as_static_dask(gram.astype(dtype), ("sel", "head", "d_head", "d_head2")),
               "proj": as_static_dask(proj.astype(dtype), ("sel", "head", "d_head", "two"))}
    data = tokens_map(_block, ("token", "sel", "head", "field"),
                      {"sel": len(layers), "head": ds.sizes["head"], "field": len(FIELDS)},
                      {"x": stream.rename(depth="sel")}, statics, dtype=np.float64,
                      att=Attention(ds, dtype), layers=[int(l) for l in layers], dt=dtype)
    fields = unpack(data, FIELDS)
    coords = {**token_coords(ds), "layer": layers, "head": np.arange(ds.sizes["head"])}
    dims = ("token", "layer", "head")
    out = xr.Dataset({n: xr.DataArray(v.astype(dtype), dims=dims) for n, v in fields.items()}, coords=coords)
    # eager: one flag per token, and a lazy coordinate derived from the lazy ``pos`` coordinate beside it
    # breaks ``dask.compute`` of the result (dask 2026.8 culls the shared source chunks)
    out = out.assign_coords(first=("token", np.asarray(ds["pos"].values) == 0))
    logs = np.log(np.maximum(out["norm"].where(~out["first"]), np.finfo(dtype).tiny))
    typical = np.exp(logs.mean("token"))
    typical = typical.drop_vars([c for c in typical.coords if c not in ("layer", "head")])
    out["typical_norm"] = typical
    out["relative_norm"] = out["norm"] / typical.where(typical > 0, 1)
    return out.assign_attrs(
        frequent_ids=most.tolist(), rare_ids=rare.tolist(), random_ids=random_ids.tolist(), seed=seed,
        frequency="merge ranks" if getattr(frequency, "name", None) == "merge_rank" else
        ("the store's tokens" if isinstance(frequency, str) else "given counts"),
        note="source messages m = (attn_norm(x) W_V + b_V) W_O of each token; relative_norm = |m| / the head's "
             "geometric-mean |m| over tokens not first in their sequence")


def _block(b: dict, *, att, layers, dt) -> np.ndarray:
    """One token chunk: the packed fields (token, sel, head, field) of ``empty_messages``."""
    x = b["x"]
    out = np.empty(x.shape[:1] + b["gram"].shape[:2] + (len(FIELDS),), np.float64)
    for i, layer in enumerate(layers):
        v = att.values(layer, x[:, i])[:, att.kv].astype(dt, copy=False)               # (T, H, e)
        sq = np.einsum("the,hef,thf->th", v, b["gram"][i], v, optimize=True)
        norm = np.sqrt(np.clip(sq, 0, None))
        dots = np.einsum("the,hed->thd", v, b["proj"][i])
        cos = np.where(norm[..., None] > 0, dots / np.where(norm > 0, norm, 1)[..., None], 0)
        out[:, i] = pack({"norm": norm, **{f"cos_{d}": cos[..., j] for j, d in enumerate(DIRECTIONS)}}, FIELDS)
    return out


def empty_message_summary(em: xr.Dataset, *, threshold: float = NEAR_EMPTY,
                          bins=np.linspace(-4, 2, 25)) -> xr.Dataset:
    """Per head, and as a distribution: how many source messages are near-empty, and whether those
    resemble frequent or rare tokens more than the random controls do. Computed.

    The first token of each sequence is reported apart (``first_*``); every other figure is over the
    rest.

    Parameters
    ----------
    em : xarray.Dataset
        An ``empty_messages`` result.
    threshold : float
        A message is near-empty when its ``relative_norm`` is below this.
    bins : array
        Edges over log10(relative_norm) for the distribution.

    Returns
    -------
    xarray.Dataset
        Over (layer, head): ``fraction_empty``, ``first_relative_norm`` (mean over sequences),
        ``cos_frequent_empty``, ``cos_rare_empty``, ``cos_random_empty``, ``cos_isotropic_empty``
        (mean cosines over the near-empty messages; NaN for a head with none) and ``cos_*_all`` (over
        all but first tokens). Over (group: first/rest, bin): ``histogram`` of log10 relative_norm,
        every head pooled. Attributes ``threshold``, ``n_tokens``, ``n_first`` and those of ``em``.
    """
    rest = em.where(~em["first"])
    empty = rest["relative_norm"] < threshold
    counted = rest["relative_norm"].notnull()
    out = {"fraction_empty": empty.sum("token") / counted.sum("token").clip(min=1),
           "first_relative_norm": em["relative_norm"].where(em["first"]).mean("token")}
    for d in DIRECTIONS:
        out[f"cos_{d}_empty"] = rest[f"cos_{d}"].where(empty).mean("token")
        out[f"cos_{d}_all"] = rest[f"cos_{d}"].mean("token")
    summary = xr.Dataset(out)
    summary = summary.drop_vars([c for c in summary.coords if c not in ("layer", "head")]).compute()
    logs = np.log10(np.maximum(np.asarray(em["relative_norm"].values, np.float64), 1e-30))
    first = np.asarray(em["first"].values)
    hist = np.stack([np.histogram(np.clip(logs[first], bins[0], bins[-1]), bins)[0],
                     np.histogram(np.clip(logs[~first], bins[0], bins[-1]), bins)[0]])
    summary["histogram"] = xr.DataArray(hist, dims=("group", "bin"),
                                        coords={"group": ["first", "rest"], "bin": (bins[:-1] + bins[1:]) / 2})
    return summary.assign_attrs(threshold=threshold, n_tokens=int((~first).sum()), n_first=int(first.sum()),
                                **em.attrs)


__all__ = ["empty_messages", "empty_message_summary", "frequency_extremes", "merge_ranks", "token_frequencies",
           "NEAR_EMPTY"]
