"""The summaries a capture kept (``summarise=``), as labelled results: statistics, quantiles, top contexts.

They cover every real token the model saw while capturing, stored or not (so a ``positions="last"``
store still has statistics over all positions); rank stores and appended captures are merged (the
merge rules are in ``streamtap.io.summaries``). Torch-free.
"""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

from ..errors import StreamtapError
from ..io import summaries as S
from ..io.location import open_group
from ..io.schema import COMMITTED_SEQUENCES, COMMITTED_TOKENS
from ._vocab import vocab_text


def _locations(source) -> list:
    if isinstance(source, xr.Dataset):
        if "summary_stores" not in source.attrs:
            raise StreamtapError("this store has no summaries (or was opened from a store object, not a path): "
                                 "capture with summarise=True (--summarise) to keep them, or pass the store's path "
                                 "to summaries()")
        stores = source.attrs["summary_stores"]
        return json.loads(stores) if isinstance(stores, str) else list(stores)
    from ..io.ranks import rank_stores

    return rank_stores(source) or [source]


def load(source, storage_options: dict | None = None) -> tuple[dict, dict[str, dict[str, np.ndarray]], dict]:
    """(meta, {group: state}, coverage) of a store's summaries, its rank stores merged in rank order
    (each rank's sequence numbers moved by the sequences of the ranks before it, as ``st.open`` does).

    ``coverage``: sequences and tokens summarised, and the sequences the store committed."""
    meta, states, offset, committed, summarised = None, {}, 0, 0, {"sequences": 0, "tokens": 0}
    for where in _locations(source):
        root = open_group(where, mode="r", storage_options=storage_options)
        attrs = dict(root.attrs)
        m, st = S.read(root)
        if m is not None:
            if meta is not None and any(m[k] != meta[k] for k in ("settings", "groups", "components")):
                raise StreamtapError(f"{where}'s summaries were kept with other settings than the first rank's; "
                                     "they cannot be merged")
            st = {g: S.shift_sequences(v, offset) for g, v in st.items()}
            states = st if meta is None else {g: S.merge(states[g], st[g]) for g in m["groups"]}
            meta = m
            summarised = {k: summarised[k] + int(m[k]) for k in summarised}
        offset += int(attrs.get(COMMITTED_SEQUENCES, 0))
        committed += int(attrs.get(COMMITTED_TOKENS, 0))
    if meta is None:
        raise StreamtapError("this store has no summaries: capture with summarise=True (--summarise) to keep them")
    return meta, states, {**summarised, "committed_sequences": offset}


def _ordered(st: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Top contexts largest first, equal values by sequence and position (the capture leaves ties in
    the order it met them)."""
    order = np.lexsort((st["top_pos"], st["top_seq"], -st["top_value"]), axis=-1)
    out = {**st, **{n: np.take_along_axis(st[n], order, 1) for n in ("top_value", "top_seq", "top_pos")}}
    out["top_window"] = np.take_along_axis(st["top_window"], order[:, :, None], 1)
    return out


def _labels(g: str, comp: dict) -> np.ndarray:
    layer, index = comp["layer"], comp["index"]
    if "label" in comp:
        return np.asarray(comp["label"])
    if g in ("head", "sink"):
        return np.array([f"L{a}H{b}" for a, b in zip(layer, index)])
    if g == "neuron":
        return np.array([f"L{a}N{b}" for a, b in zip(layer, index)])
    return np.array([f"L{a}_{g}" for a in layer])


def summaries(source, q=(0.01, 0.1, 0.5, 0.9, 0.99), *, tokenizer=None, text: bool = True,
              storage_options: dict | None = None) -> dict[str, xr.Dataset]:
    """Each summarised group as a Dataset over ``component``: ``count``, ``mean``, ``var`` (population),
    ``std``, ``min``, ``max``, ``quantile`` (component, q) from the sketch (neurons captured with
    ``neuron_quantiles=False`` have none; their attribute ``quantile`` says so), and the top contexts
    (component, rank): ``top_value``, ``top_seq``, ``top_pos``, ``top_token`` (the id at that position),
    ``top_window`` (component, rank, offset; -1 outside the sequence) and, with ``text``,
    ``top_text``: the window as text with the top token in brackets.

    Parameters
    ----------
    source : xarray.Dataset or path
        A store opened with ``st.open`` from a path or URL, or the path itself.
    q : sequence of float
        Quantiles to estimate; each is within ``alpha + 4e-6`` relative of the exact order statistic
        ``floor(q (n - 1))`` (numpy ``method="lower"``) where its magnitude lies in the sketch's
        ``[low, high]`` (attribute ``sketch``), within ``low`` absolute below that.
    tokenizer : optional
        Decodes the windows; else the store's own token text (ids it never stored read ``<id>``).

    The attributes say what the summaries cover: ``tokens`` and ``sequences`` summarised (every real
    token the model saw while capturing, padding excluded) against ``committed_sequences``; fewer
    where a capture that failed could not write its summaries.
    """
    meta, states, coverage = load(source, storage_options)
    ds = source if isinstance(source, xr.Dataset) else None
    q = np.atleast_1d(np.asarray(q, np.float64))
    out = {}
    settings = S.Settings(**meta["settings"])
    w = settings.window
    for g in meta["groups"]:
        st, comp = states[g], meta["components"][g]
        n = st["count"].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(n > 0, st["m2"] / n, np.nan)
        coords = {"component": _labels(g, comp), "layer": ("component", np.asarray(comp["layer"], np.int32)),
                  "index": ("component", np.asarray(comp["index"], np.int32)), "q": q,
                  "offset": np.arange(-w, w + 1)}
        st = _ordered(st)
        filled = st["top_seq"] >= 0
        top_token = np.where(filled, st["top_window"][:, :, w], -1)
        data = {"count": ("component", st["count"]), "mean": ("component", st["mean"]), "var": ("component", var),
                "std": ("component", np.sqrt(var)), "min": ("component", st["min"]), "max": ("component", st["max"]),
                "top_value": (("component", "rank"), np.where(filled, st["top_value"], np.nan)),
                "top_seq": (("component", "rank"), st["top_seq"]), "top_pos": (("component", "rank"), st["top_pos"]),
                "top_token": (("component", "rank"), top_token),
                "top_window": (("component", "rank", "offset"), st["top_window"])}
        attrs = {"group": g, "value": _VALUE[g], "sketch": json.dumps(meta["settings"]), **coverage}
        if st["hist"].shape[1]:
            data["quantile"] = (("component", "q"), S.quantiles(st["hist"], st["min"], st["max"], q, settings))
        else:
            attrs["quantile"] = NO_QUANTILES
        out[g] = xr.Dataset(data, coords=coords, attrs=attrs)
        if text:
            out[g]["top_text"] = context_text(out[g], ds, tokenizer)
    return out


NO_QUANTILES = ("not kept: the capture summarised neurons with neuron_quantiles=False (no sketch); capture with "
                "summarise={'neuron_quantiles': True} (the default) for their quantiles")
"""The ``quantile`` attribute of a group captured without a sketch (which then has no ``quantile`` variable)."""


def context_text(result: xr.Dataset, ds: xr.Dataset | None = None, tokenizer=None) -> xr.DataArray:
    """(component, rank) text of each top context of a ``summaries`` result (or a selection of its
    components): the window's tokens with the top token in brackets; ids decoded once each."""
    windows, w = result.top_window.values, result.sizes["offset"] // 2
    return xr.DataArray(_window_text(ds, windows, result.top_seq.values >= 0, w, tokenizer),
                        dims=("component", "rank"), coords={"component": result.component})


_VALUE = {"head": "the norm of the head's output (z @ W_O) at each token",
          "sink": "the attention probability the head's query puts on its sequence's first real token (sink mass)",
          "mlp": "the norm of the MLP's output term", "mixer": "the norm of the mixer's output term",
          "neuron": "the neuron's activation", "projection": "the component's contribution onto the direction"}


def _window_text(ds, windows: np.ndarray, filled: np.ndarray, w: int, tokenizer) -> np.ndarray:
    """Each top context's window as one string, its own token in brackets (ids decoded once each)."""
    ids = np.unique(windows[windows >= 0])
    if ds is None and tokenizer is None:
        known = {int(i): f"<{int(i)}>" for i in ids}
    else:
        known = dict(zip(ids.tolist(), vocab_text(ds, ids, tokenizer).tolist())) if len(ids) else {}
    out = np.empty(windows.shape[:2], dtype=object)
    for c in range(windows.shape[0]):
        for r in range(windows.shape[1]):
            if not filled[c, r]:
                out[c, r] = ""
                continue
            row = windows[c, r]
            out[c, r] = ("".join(known[int(i)] for i in row[:w] if i >= 0) + "[" + known[int(row[w])] + "]"
                         + "".join(known[int(i)] for i in row[w + 1:] if i >= 0))
    return out


__all__ = ["summaries", "load", "context_text"]
