"""Figures of attention patterns: query x key heatmaps of chosen heads, and layer x head grids of the
routing scores (sink, previous token, induction) from ``head_scores``. Also importable from
``streamtap.report.figures``."""

from __future__ import annotations

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from ._draw import _show, _tick_step


def _gaps(pos) -> list[int]:
    """Indices after which the positions jump (a cropped window next to the sink)."""
    pos = np.asarray(pos)
    return [int(i) for i in np.flatnonzero(np.diff(pos) > 1)]


def attention_heatmap(att: xr.DataArray, heads=None, *, notes: dict | None = None, n: int = 6,
                      max_labels: int = 40, title: str | None = None) -> Figure:
    """Query x key attention probabilities of chosen heads over one sequence, one panel per head.

    Keys a query cannot see (probability exactly 0: the causal mask, a sliding window) are grey.
    The colour scale is the square root of the probability from 0 to 1, shared by the panels, so
    that a head spreading its attention thinly still shows next to one parked on a sink. Token
    texts label both axes; past ``max_labels`` tokens only every k-th is written (the first always).
    Where the query or key positions jump (a window cropped out of a long sequence, with the first
    token kept as a key), a white line marks the gap.

    Parameters
    ----------
    att : xarray.DataArray
        An ``attention(ds, seq, ...)`` result (dims ``layer, head, query, key``), lazy or computed;
        only the chosen heads are computed.
    heads : sequence of (int, int), optional
        The (layer, head) pairs to draw (default: the first ``n`` of ``att``).
    notes : dict, optional
        (layer, head) -> a short text written under the panel's title (why the head is shown).
    n : int
        How many heads when ``heads`` is not given.
    max_labels : int
        The most token labels per axis.
    title : str, optional
        The figure's title (default: the sequence).

    Returns
    -------
    matplotlib.figure.Figure
        One panel per head, on a shared colour scale.

    Raises
    ------
    ValueError
        ``att`` is not (layer, head, query, key), or no head is chosen.
    """
    import dask
    from matplotlib.colors import PowerNorm

    if att.dims != ("layer", "head", "query", "key"):
        raise ValueError(f"give an attention(ds, seq) result (layer, head, query, key), got {att.dims}")
    if heads is None:
        heads = [(int(l), int(h)) for l in att.layer.values for h in att["head"].values][:n]
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads:
        raise ValueError("no head to draw")
    notes = notes or {}
    data = dask.compute(*[att.sel(layer=l, head=h).data for l, h in heads])
    nq, nk = att.sizes["query"], att.sizes["key"]
    labels = {}
    for side, size in (("query", nq), ("key", nk)):
        name = f"{side}_text" if f"{side}_text" in att.coords else f"{side}_token_id"
        texts = [_show(t, 10) for t in np.asarray(att[name].values)] if name in att.coords else \
            [str(i) for i in range(size)]
        step = _tick_step(size, max_labels)
        labels[side] = (list(range(0, size, step)), texts[::step])
    fs = 7 if max(nq, nk) <= 24 else 6
    ncols = min(3 if max(nq, nk) <= 24 else 2, len(heads))     # long sequences: fewer, larger panels
    nrows = -(-len(heads) // ncols)
    size = min(5.0, max(2.8, 0.13 * max(nq, nk) + 1.5))
    fig = Figure(figsize=(ncols * size + 1.0, nrows * (size + 0.35) + 0.5), layout="constrained")
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
    cmap = _cmap_with_bad("viridis", "#d9d9d9")
    im = None
    for i, ((l, h), a) in enumerate(zip(heads, data)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        a = np.asarray(a, np.float64)
        im = ax.imshow(np.ma.masked_where(a == 0, a), cmap=cmap, norm=norm, aspect="equal",
                       interpolation="nearest")
        note = notes.get((l, h))
        ax.set_title(f"L{l}H{h}" + (f"\n{note}" if note else ""), fontsize=8.5)
        ax.set_xticks(*labels["key"], rotation=90, fontsize=fs)
        ax.set_yticks(*labels["query"], fontsize=fs)
        for g in _gaps(att["key_pos"].values if "key_pos" in att.coords else []):
            ax.axvline(g + 0.5, color="white", lw=1.5)
        for g in _gaps(att["query_pos"].values if "query_pos" in att.coords else []):
            ax.axhline(g + 0.5, color="white", lw=1.5)
        if i % ncols == 0:
            ax.set_ylabel("query (reads)", fontsize=8)
        if i + ncols >= len(heads):                                # no panel below this one
            ax.set_xlabel("key (is read)", fontsize=8)
    fig.colorbar(im, ax=fig.axes, shrink=0.6, label="probability (√ scale)")
    seq = att.attrs.get("seq")
    fig.suptitle(title or ((f"attention patterns, sequence {seq}" if seq is not None else "attention patterns")
                           + " (grey: keys the query cannot see)"), fontsize=10)
    return fig


def _cmap_with_bad(name: str, bad: str):
    """A named colour map whose masked cells are ``bad``."""
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


SCORE_NAMES = {"sink_mass": "sink mass", "previous_token": "previous token", "induction": "induction",
               "duplicate_token": "duplicate token", "off": "off (share of queries)",
               "sink_message": "sink's message / typical"}


def head_score_grid(scores: xr.Dataset, which=("sink_mass", "previous_token", "induction"), *,
                    off: float | None = 0.5, annotate: int = 3, title: str | None = None) -> Figure:
    """Layer x head grids of routing scores (from ``head_scores``), one panel per score, heads that
    are off marked.

    Every score is a share of attention (0..1), drawn on one colour scale. A cross marks the heads
    whose ``off`` share (queries parked on a sink whose message is small) reaches ``off``; the
    ``annotate`` highest heads of each panel have their value written on them. Each panel's title
    says over how many queries its score averages (induction and duplicate-token scores need
    repeated tokens in the text).

    Parameters
    ----------
    scores : xarray.Dataset
        A ``head_scores`` result (dims ``layer, head``).
    which : sequence of str
        The score variables to draw, one panel each.
    off : float, optional
        Mark heads whose ``off`` share is at least this (None: no marks).
    annotate : int
        How many of each panel's highest heads get their value written.
    title : str, optional
        The figure's title.

    Returns
    -------
    matplotlib.figure.Figure
        One layer x head panel per score, on a shared colour scale.
    """
    which = list(which)
    n_layers, n_heads = scores.sizes["layer"], scores.sizes["head"]
    layers, heads = scores.layer.values, scores["head"].values
    fig = Figure(figsize=(len(which) * (0.3 * n_heads + 1.3) + 1.2, max(3.4, 0.2 * n_layers + 1.9)),
                 layout="constrained")
    offs = None
    if off is not None and "off" in scores:
        offs = np.argwhere(np.asarray(scores["off"].values) >= off)
    step = _tick_step(n_layers, 32)
    im = None
    for i, name in enumerate(which):
        ax = fig.add_subplot(1, len(which), i + 1)
        values = np.asarray(scores[name].values, np.float64)
        im = ax.imshow(values, cmap="magma_r", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        counts = scores.get(f"{name}_queries")
        q = int(np.max(counts.values)) if counts is not None and counts.size else None
        ax.set_title(SCORE_NAMES.get(name, name) + (f"\n({q:,} queries a layer)" if q is not None else ""),
                     fontsize=8.5)
        ax.set_xticks(range(n_heads), [str(h) for h in heads], fontsize=7)
        ax.set_yticks(range(0, n_layers, step), [str(layer) for layer in layers[::step]], fontsize=7)
        ax.set_xlabel("head", fontsize=8)
        if i == 0:
            ax.set_ylabel("layer", fontsize=8)
        for r in np.argsort(-values, axis=None)[:annotate]:
            li, hi = divmod(int(r), n_heads)
            ax.text(hi, li, f"{values[li, hi]:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if values[li, hi] > 0.55 else "black")
        if offs is not None and len(offs):
            # in the cell's upper right corner, clear of a value written at its centre
            ax.scatter(offs[:, 1] + 0.3, offs[:, 0] - 0.28, marker="x", s=10, lw=0.9, color="#1f9e89",
                       label=f"off at ≥ {off:.0%} of queries (the sink's message is small)")
    if offs is not None and len(offs):
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles[:1], labels[:1], fontsize=7.5, loc="outside lower center", frameon=False)
    fig.colorbar(im, ax=fig.axes, shrink=0.7, label="share of attention")
    fig.suptitle(title or "head scores: mean attention on the sink, the previous token and induction targets",
                 fontsize=10)
    return fig
