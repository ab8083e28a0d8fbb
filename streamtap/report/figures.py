"""Figures for the analyses, with matplotlib's object API (no pyplot state, any backend, thread safe).

    fig = figures.contribution_heatmap(dla.isel(token=i))        # layer x head, plus bias and MLP columns
    fig = figures.logit_lens_table(lens.isel(token=i), text)     # depth x top-k tokens, shaded by probability
    fig = figures.token_maps(relevance(ds, words))               # token x token maps of chosen heads
    fig = figures.effective_rank_bars(effective_rank(ds))        # fused against factored, per layer
    fig = figures.message_norm_distribution(empty_messages(ds))  # relative message norms, per layer and head
    fig = figures.attention_heatmap(attention(ds, seq=3), [(18, 6)])  # query x key, one panel per head
    fig = figures.head_score_grid(head_scores(ds))                # layer x head: sink, previous token, induction
    fig = figures.logit_lens_grid(logit_lens(ds.isel(token=rows)), text)  # positions x depths over a passage
    fig = figures.residual_pca_scree(residual_stream(ds))        # PCA scree per depth, first tokens apart
    figures.save(fig, "paris.png")

Every function takes the (computed or small) result of one analysis and returns a
``matplotlib.figure.Figure``. ``text`` arguments map an array of vocabulary ids to their text
(``lambda ids: streamtap.analysis.vocab_text(ds, ids, tokenizer)``); without one, ids are shown.
"""

from __future__ import annotations

import io

import numpy as np
import xarray as xr
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DIVERGING = "RdBu_r"


def save(fig: Figure, path, dpi: int = 110) -> None:
    """Write a figure to a file, cropped to its contents.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        A figure from this module (or any other).
    path : str or os.PathLike
        Where to write; the extension picks the format (``.png``, ``.svg``, ``.pdf``, ...).
    dpi : int
        Resolution of raster formats.

    Returns
    -------
    None
    """
    fig.savefig(path, dpi=dpi, bbox_inches="tight")


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """A figure as PNG bytes, cropped to its contents (the report embeds them in its page).

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        The figure.
    dpi : int
        Resolution.

    Returns
    -------
    bytes
        The PNG file.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _ids_text(text, ids) -> np.ndarray:
    """The text of ``ids`` through ``text``, or ``#id`` without it."""
    ids = np.asarray(ids)
    if text is None:
        return np.array([f"#{int(i)}" for i in ids.reshape(-1)], dtype=object).reshape(ids.shape)
    return np.asarray(text(ids), dtype=object)


def _show(s: str, width: int = 14) -> str:
    """Token text made visible: a token of spaces alone as open boxes, a leading space as a dot, newlines
    escaped, long text cut."""
    s = str(s)
    if s and not s.strip(" "):
        s = "␣" * len(s)
    s = s.replace("\n", "\\n").replace("\t", "\\t")
    s = ("·" + s[1:]) if s.startswith(" ") else s
    return s if len(s) <= width else s[:width - 1] + "…"


def _symmetric(values) -> TwoSlopeNorm:
    """A colour norm centred on 0 and symmetric around it, so that sign reads as colour."""
    lim = float(np.nanmax(np.abs(values))) if np.size(values) else 1.0
    lim = lim if lim > 0 else 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)


# -- 1. layer x head contributions -------------------------------------------------------------------
def contribution_heatmap(contrib: xr.DataArray, *, title: str | None = None, annotate: int = 8) -> Figure:
    """Direct contributions at one token: heads as a layer x head grid, biases and MLPs beside it.

    Each layer's attention bias and MLP (or the sum of its neurons, experts and norm betas) form two
    columns beside the grid, on the same colour scale centred on 0; components of no layer
    (embeddings, the final norm's and unembedding's biases) are listed above it with their values.

    Parameters
    ----------
    contrib : xarray.DataArray
        A ``direct_logit_attribution`` result at one token (dims ``("component",)``), lazy or
        computed.
    title : str, optional
        The figure's title (default: "direct logit attribution").
    annotate : int
        How many of the largest contributions in absolute value get their value written on them
        (where they are a head, an attention bias or an MLP).

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        ``contrib`` has dims other than ``("component",)``.
    """
    contrib = contrib.compute() if hasattr(contrib, "compute") else contrib
    if contrib.dims != ("component",):
        raise ValueError(f"give the contributions at one token (dims ('component',)), got {contrib.dims}")
    kind, layer, head = contrib.kind.values, contrib.layer.values, contrib["head"].values
    vals = np.asarray(contrib.values, np.float64)
    n_layers = int(layer.max()) + 1 if (layer >= 0).any() else 0
    n_heads = int(head.max()) + 1 if (head >= 0).any() else 0
    grid = np.zeros((n_layers, n_heads))
    side = np.zeros((n_layers, 2))
    for k, l, h, v in zip(kind, layer, head, vals):
        if k == "head":
            grid[l, h] += v
        elif k == "attn_bias":
            side[l, 0] += v
        elif l >= 0:          # mlp, neurons, mlp bias, experts, norm betas of a layer
            side[l, 1] += v
    norm = _symmetric(np.concatenate([grid.ravel(), side.ravel()]))
    height = max(3.0, 0.22 * n_layers + 1.6)
    fig = Figure(figsize=(2.2 + 0.42 * n_heads + 1.6, height), layout="constrained")
    gs = fig.add_gridspec(1, 2, width_ratios=[max(n_heads, 1), 2.4], wspace=0.08)
    ax, ax2 = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    im = ax.imshow(grid, cmap=DIVERGING, norm=norm, aspect="auto", interpolation="nearest")
    ax2.imshow(side, cmap=DIVERGING, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    step = max(1, -(-n_layers // 32))
    ax.set_yticks(range(0, n_layers, step))
    ax2.set_xticks([0, 1], ["attn\nbias", "MLP"])
    ax2.set_yticks([])
    order = np.argsort(-np.abs(vals))[:annotate]
    lim = norm.vmax
    for i in order:
        l, h = layer[i], head[i]
        color = "white" if abs(vals[i]) > 0.6 * lim else "black"
        if kind[i] == "head":
            ax.text(h, l, f"{vals[i]:+.1f}", ha="center", va="center", fontsize=6.5, color=color)
        elif kind[i] in ("attn_bias", "mlp") and l >= 0:
            ax2.text(0 if kind[i] == "attn_bias" else 1, l, f"{vals[i]:+.1f}", ha="center", va="center",
                     fontsize=6.5, color=color)
    fig.colorbar(im, ax=[ax, ax2], shrink=0.8, label="direct logit contribution")
    others = {str(c): float(v) for c, k, l, v in zip(contrib.component.values, kind, layer, vals) if l < 0}
    sub = ", ".join(f"{c} {v:+.2f}" for c, v in others.items())
    fig.suptitle(title or "direct logit attribution", fontsize=10)
    if sub:
        ax.set_title(sub, fontsize=7.5, loc="left")
    return fig


# -- 2. logit lens -------------------------------------------------------------------------------------
def logit_lens_table(lens: xr.Dataset, text=None, *, k: int | None = None, title: str | None = None) -> Figure:
    """Top-k tokens at every depth for one token, shaded by probability.

    Parameters
    ----------
    lens : xarray.Dataset
        A ``logit_lens`` result at one token (dims ``depth``, ``k``), lazy or computed.
    text : callable, optional
        Maps an array of vocabulary ids to their text; without one, ids are shown as ``#id``.
    k : int, optional
        How many columns (default: all of ``lens``'s k).
    title : str, optional
        The figure's title (default: "logit lens").

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        ``lens`` still has a ``token`` dim.
    """
    if "token" in lens.dims:
        raise ValueError("give the logit lens at one token: lens.isel(token=i)")
    lens = lens.compute()
    k = min(k or lens.sizes["k"], lens.sizes["k"])
    ids = lens.top_id.values[:, :k]
    probs = lens.top_prob.values[:, :k]
    words = _ids_text(text, ids)
    depths = [str(d) for d in lens.depth.values]
    n = len(depths)
    fig = Figure(figsize=(1.35 * k + 1.6, 0.27 * n + 1.0), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(probs, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for r in range(n):
        for c in range(k):
            ax.text(c, r, f"{_show(words[r, c], 11)} {probs[r, c]:.2f}", ha="center", va="center", fontsize=6.5,
                    color="white" if probs[r, c] > 0.6 else "black")
    ax.set_yticks(range(n), depths, fontsize=7)
    ax.set_xticks(range(k), [f"top {i + 1}" for i in range(k)], fontsize=7)
    ax.xaxis.tick_top()
    fig.colorbar(im, ax=ax, shrink=0.6, label="probability")
    ax.set_title(title or "logit lens", fontsize=10, pad=16)
    return fig


# -- 3. token-to-token maps --------------------------------------------------------------------------
def pick_heads(maps: xr.Dataset, n: int = 6, which: str = "raw") -> list[tuple[int, int]]:
    """The heads whose map varies most: largest standard deviation of ``which`` over the map.

    Parameters
    ----------
    maps : xarray.Dataset
        A ``relevance`` or ``promotion`` result (dims layer, head and two token dims).
    n : int
        How many heads.
    which : str
        The variable to rank by: ``"raw"`` or ``"normalized"``.

    Returns
    -------
    list of (int, int)
        (layer, head) pairs, the most varied first.
    """
    spread = maps[which].std(dim=list(maps[which].dims[2:])).values
    order = np.argsort(-spread.reshape(-1))[:n]
    layers, heads = maps.layer.values, maps["head"].values
    return [(int(layers[i // spread.shape[1]]), int(heads[i % spread.shape[1]])) for i in order]


def token_maps(maps: xr.Dataset, heads=None, *, which: str = "normalized", n: int = 6, title: str | None = None) -> Figure:
    """Token x token maps (relevance: query x key, promotion: source x target) of some heads.

    Normalised relevance (rows sum to 1) is drawn from 0 up; everything else on a diverging scale
    centred on 0. All maps share one colour scale.

    Parameters
    ----------
    maps : xarray.Dataset
        A ``relevance`` or ``promotion`` result.
    heads : sequence of (int, int), optional
        The (layer, head) pairs to draw; by default the ``n`` heads whose raw map varies most
        (``pick_heads``).
    which : str
        The variable to draw: ``"normalized"`` or ``"raw"``.
    n : int
        How many heads to pick when ``heads`` is not given.
    title : str, optional
        The figure's title (default: the two token dims and ``which``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    rows_dim, cols_dim = maps[which].dims[2:]
    heads = list(heads) if heads is not None else pick_heads(maps, n)
    row_text = [_show(t) for t in maps[f"{rows_dim}_text"].values]
    col_text = [_show(t) for t in maps[f"{cols_dim}_text"].values]
    ncols = min(3, len(heads))
    nrows = -(-len(heads) // ncols)
    size = 0.42 * max(len(row_text), len(col_text)) + 1.6
    fig = Figure(figsize=(ncols * size + 1.2, nrows * size + 0.8), layout="constrained")
    data = [maps[which].sel(layer=l, head=h).values for l, h in heads]
    if which == "normalized" and rows_dim == "query":
        norm, cmap = None, "viridis"
        vmin, vmax = 0.0, float(max(np.max(d) for d in data))
    else:
        norm, cmap = _symmetric(np.stack(data)), DIVERGING
        vmin = vmax = None
    im = None
    for i, ((l, h), m) in enumerate(zip(heads, data)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        im = ax.imshow(m, cmap=cmap, norm=norm, vmin=vmin, vmax=vmax, aspect="equal", interpolation="nearest")
        ax.set_title(f"L{l}H{h}", fontsize=9)
        ax.set_xticks(range(len(col_text)), col_text, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(row_text)), row_text, fontsize=7)
        if i % ncols == 0:
            ax.set_ylabel(rows_dim, fontsize=8)
        ax.set_xlabel(cols_dim, fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=fig.axes, shrink=0.7, label=which)
    fig.suptitle(title or f"{rows_dim} x {cols_dim} ({which})", fontsize=10)
    return fig


# -- 4. effective ranks ------------------------------------------------------------------------------
def effective_rank_bars(er: xr.Dataset, *, definition: str = "entropy", title: str | None = None) -> Figure:
    """Per layer, mean effective rank over heads of the factors and the fused matrices (min-max bars).

    Two panels, W_Q, W_K, W_QK and W_V, W_O, W_OV, with d_head dotted as the bound of every rank.

    Parameters
    ----------
    er : xarray.Dataset
        An ``effective_rank`` result.
    definition : str
        ``"entropy"`` (``erank_entropy``) or ``"energy"`` (``erank_energy``).
    title : str, optional
        The figure's title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    var = {"entropy": "erank_entropy", "energy": "erank_energy"}[definition]
    groups = (("W_Q", "W_K", "W_QK"), ("W_V", "W_O", "W_OV"))
    layers = er.layer.values
    # lines with min-max bands: readable at any depth in a fixed width (bars grew with the layers)
    fig = Figure(figsize=(10, 5.6), layout="constrained")
    colors = {"W_Q": "#9ecae1", "W_K": "#4292c6", "W_QK": "#08306b", "W_V": "#fdae6b", "W_O": "#e6550d",
              "W_OV": "#7f2704"}
    step = max(1, -(-len(layers) // 16))
    for row, group in enumerate(groups):
        ax = fig.add_subplot(2, 1, row + 1)
        for m in group:
            v = er[var].sel(matrix=m)
            mean, lo, hi = v.mean("head").values, v.min("head").values, v.max("head").values
            ax.fill_between(layers, lo, hi, color=colors[m], alpha=0.2, lw=0)
            ax.plot(layers, mean, color=colors[m], lw=1.6, marker="o", ms=3, label=m)
        ax.set_xticks(layers[::step])
        ax.tick_params(labelsize=9)
        ax.set_ylabel(f"effective rank\n({definition})", fontsize=10)
        ax.axhline(er.sizes["index"], color="grey", lw=0.8, ls=":")
        ax.set_ylim(0, er.sizes["index"] * 1.04)
        # whole-number ticks: their labels keep one width between constrained layout's passes (with
        # 12.5-style labels it made room for narrower ones, and the axis label left the figure)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=9, ncols=3, loc="lower right")
    fig.axes[-1].set_xlabel("layer", fontsize=10)
    fig.suptitle(title or "effective rank of factors and fused matrices (mean over heads; band: min to max; "
                          "dotted: d_head)", fontsize=10)
    return fig


def overflowing_text(fig: Figure) -> list[str]:
    """What of ``fig`` reaches outside the figure once drawn: an axes' labels, ticks or title (named by
    its title or axis labels), or a figure-level text. Only what is drawn counts.

    Parameters
    ----------
    fig : matplotlib.figure.Figure

    Returns
    -------
    list of str
        The offenders; empty when everything is inside (what the report's tests require).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox

    def outside(ext) -> bool:
        return ext.x0 < box.x0 - 1 or ext.y0 < box.y0 - 1 or ext.x1 > box.x1 + 1 or ext.y1 > box.y1 + 1

    out = []
    for ax in fig.axes:
        ext = ax.get_tightbbox(renderer)
        if ext is not None and outside(ext):
            out.append(ax.get_title() or ax.get_ylabel() or ax.get_xlabel() or "an unlabelled axes")
    for text in fig.texts:
        if text.get_visible() and text.get_text().strip() and outside(text.get_window_extent(renderer)):
            out.append(text.get_text())
    return out


# -- 5. message norms --------------------------------------------------------------------------------
def message_norm_distribution(em: xr.Dataset, *, threshold: float | None = 0.1,
                              title: str | None = None) -> Figure:
    """Distribution of relative source-message norms per layer, first tokens apart, and per head the
    share of near-empty messages.

    Left: violins of log10 ``relative_norm`` per layer over the tokens that are not first in their
    sequence, with the first tokens' values as dots. Right: a layer x head map of the share of those
    tokens below ``threshold``.

    Parameters
    ----------
    em : xarray.Dataset
        An ``empty_messages`` result (it is computed here, so select tokens first on big stores).
    threshold : float, optional
        The near-empty bound, drawn as a line; ``None`` or 0 maps each head's median log10
        relative norm instead.
    title : str, optional
        The figure's title (default: the number of tokens).

    Returns
    -------
    matplotlib.figure.Figure
    """
    em = em.compute()
    rel = np.asarray(em.relative_norm.values, np.float64)            # (token, layer, head)
    first = np.asarray(em["first"].values, bool) if "first" in em.coords else np.zeros(rel.shape[0], bool)
    logs = np.log10(np.clip(rel, 1e-6, None))
    rest = logs[~first] if (~first).any() else logs
    n_layers, n_heads = rel.shape[1], rel.shape[2]
    fig = Figure(figsize=(11, max(3.6, 0.2 * n_layers + 1.6)), layout="constrained")
    gs = fig.add_gridspec(1, 2, width_ratios=[1.5, 1], wspace=0.25)
    ax = fig.add_subplot(gs[0])
    parts = ax.violinplot([rest[:, l].reshape(-1) for l in range(n_layers)], positions=range(n_layers),
                          showmedians=True, widths=0.8)
    for body in parts["bodies"]:
        body.set_alpha(0.5)
    if first.any():
        xs = np.repeat(np.arange(n_layers), first.sum() * n_heads)
        ys = np.transpose(logs[first], (1, 0, 2)).reshape(-1)
        ax.scatter(xs, ys, s=4, color="black", alpha=0.4, label="first token of a sequence")
    if threshold:
        ax.axhline(np.log10(threshold), color="crimson", lw=0.8, ls="--", label=f"near-empty < {threshold:g}")
    if threshold or first.any():
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("layer")
    ax.set_ylabel("log10 |source message| / head's typical", fontsize=8)
    step = max(1, -(-n_layers // 15))
    ax.set_xticks(range(0, n_layers, step))
    ax2 = fig.add_subplot(gs[1])
    if threshold:
        frac = (rest < np.log10(threshold)).mean(0)
        im = ax2.imshow(frac, cmap="magma_r", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        label = "share of near-empty messages"
    else:
        im = ax2.imshow(np.median(rest, 0), cmap="viridis", aspect="auto", interpolation="nearest")
        label = "median log10 relative norm"
    ax2.set_xlabel("head")
    ax2.set_ylabel("layer")
    ax2.set_xticks(range(0, n_heads, max(1, -(-n_heads // 16))))
    ax2.set_yticks(range(0, n_layers, step))
    fig.colorbar(im, ax=ax2, shrink=0.8, label=label)
    fig.suptitle(title or f"source-message norms over {rel.shape[0]:,} tokens ({int(first.sum())} first tokens "
                 "shown apart)", fontsize=10)
    return fig


# -- 6. attention patterns -------------------------------------------------------------------------
def _tick_step(n: int, max_labels: int) -> int:
    """Every how many tokens a label goes, so that at most ``max_labels`` are written."""
    return max(1, -(-n // max(1, max_labels)))


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
    """
    which = list(which)
    n_layers, n_heads = scores.sizes["layer"], scores.sizes["head"]
    layers, heads = scores.layer.values, scores["head"].values
    fig = Figure(figsize=(len(which) * (0.3 * n_heads + 1.3) + 1.2, max(3.4, 0.2 * n_layers + 1.9)),
                 layout="constrained")
    offs = None
    if off is not None and "off" in scores:
        offs = np.argwhere(np.asarray(scores["off"].values) >= off)
    step = max(1, -(-n_layers // 32))
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


# -- 7. logit lens over a passage --------------------------------------------------------------------
def logit_lens_grid(lens: xr.Dataset, text=None, *, targets=None, color: str = "top", max_positions: int = 24,
                    title: str | None = None) -> Figure:
    """The logit lens over a passage: positions x depths, each cell the top token there.

    Columns are the passage's tokens (the input token below, and with a target the token each
    position is scored against above), rows the depths (the residual entering each layer up to the
    final residual, which is the model's own prediction, at the top). Each cell shows the top-1
    token read through the final norm and the unembedding; its colour is that token's probability
    (``color="top"``) or the target's (``color="target"``). With a target, cells where the target
    is already the top-1 are written in bold.

    Parameters
    ----------
    lens : xarray.Dataset
        A ``logit_lens`` result over a passage's tokens in order (dims ``token, depth, k``), lazy or
        computed; with ``target`` per token for ``color="target"``.
    text : callable, optional
        Maps an array of vocabulary ids to their text; without one, ids are shown as ``#id``.
    targets : array of int, optional
        The target id of each of ``lens``'s tokens (what ``logit_lens`` was given as ``target``),
        written above the columns.
    color : str
        ``"top"`` or ``"target"``.
    max_positions : int
        Keep the last this many tokens.
    title : str, optional
        The figure's title.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        ``lens`` has no ``token`` dim, or ``color="target"`` without a target.
    """
    if "token" not in lens.dims:
        raise ValueError("give the logit lens over a passage's tokens (a token dim), e.g. logit_lens(ds.isel(token=rows))")
    if color not in ("top", "target"):
        raise ValueError(f"color must be 'top' or 'target', got {color!r}")
    if color == "target" and "target_prob" not in lens:
        raise ValueError("color='target' needs a logit_lens computed with a target")
    lens_tokens = lens.sizes["token"]
    lens = lens.isel(token=slice(-max_positions, None)).compute()
    ids = lens.top_id.values[:, :, 0].T                                  # (depth, position)
    words = _ids_text(text, ids)
    probs = (lens.target_prob if color == "target" else lens.top_prob.isel(k=0)).values.T
    hit = (lens.target_rank.values.T == 0) if "target_rank" in lens else np.zeros(ids.shape, bool)
    n_depth, n_pos = ids.shape
    fig = Figure(figsize=(0.72 * n_pos + 2.2, 0.21 * n_depth + 2.0), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(probs, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest", origin="lower")
    for r in range(n_depth):
        for c in range(n_pos):
            ax.text(c, r, _show(words[r, c], 8), ha="center", va="center", fontsize=6.5,
                    fontweight="bold" if hit[r, c] else "normal", color="white" if probs[r, c] > 0.55 else "black")
    inputs = lens["text"].values if "text" in lens.coords else lens["token_id"].values
    ax.set_xticks(range(n_pos), [_show(t, 10) for t in inputs], rotation=60, ha="right", fontsize=7)
    step = max(1, -(-n_depth // 40))
    ax.set_yticks(range(0, n_depth, step), [str(d) for d in lens.depth.values[::step]], fontsize=6.5)
    ax.set_xlabel("input token (position in the passage)", fontsize=8)
    ax.set_ylabel("depth (residual read as a prediction)", fontsize=8)
    if targets is not None:
        tids = np.broadcast_to(np.asarray(targets), (lens_tokens,))[-n_pos:]
        top = ax.secondary_xaxis("top")
        top.set_xticks(range(n_pos), ["→" + _show(t, 9) for t in _ids_text(text, tids)], rotation=60,
                       ha="left", fontsize=7)
        top.set_xlabel("target (the next token)", fontsize=8)
    label = "probability of the target" if color == "target" else "probability of the top token"
    fig.colorbar(im, ax=ax, shrink=0.7, label=label)
    fig.suptitle(title or "logit lens over a passage (bold: the target is already the top token)", fontsize=10)
    return fig


# -- 8. residual PCA scree ---------------------------------------------------------------------------
def _explained(x: np.ndarray, n: int) -> np.ndarray:
    """Explained variance ratios of the first ``n`` principal components of the rows of ``x`` (centred)."""
    out = np.full(n, np.nan)
    if x.shape[0] < 2:
        return out
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    total = s.sum()
    m = min(n, s.size)
    out[:m] = s[:m] / total if total > 0 else 0.0
    return out


def residual_pca(stack: xr.DataArray, *, first=None, massive: float = 5.0, n_components: int = 20) -> xr.Dataset:
    """PCA of the residual pooled over tokens, at each depth, with and without the first tokens.

    What is PCA'd: at each depth of ``stack`` (e.g. the residual entering a few layers and the final
    residual, from ``residual_stream``), the residuals of its tokens, pooled over sequences and
    centred on their mean; each depth separately, in float64 with numpy. Three groups of tokens:

    - ``all``: every token;
    - ``rest``: the first token of every sequence left out (its residual is far larger than the
      rest's and a pooled PCA spends its first component on it);
    - ``typical``: also every other token whose residual norm exceeds ``massive`` times the
      median norm of the rest (some models write a massive residual on a few later tokens too,
      e.g. SmolLM2 on the second token of some sequences).

    Parameters
    ----------
    stack : xarray.DataArray
        (token, depth, d_model) or (token, d_model), computed or lazy (it is computed here).
    first : array of bool, optional
        Which tokens are first in their sequence (default: the ``pos`` coordinate equals 0).
    massive : float
        The norm, in medians of the rest's, above which a later token is left out of ``typical``.
    n_components : int
        How many components to keep.

    Returns
    -------
    xarray.Dataset
        ``explained_variance_ratio`` (depth, group, pc) with group ``all``, ``rest`` and
        ``typical``; per depth ``first_share`` (the share of the pooled variance, the sum of squared
        distances to the pooled mean, that the first tokens carry), ``first_norm_ratio`` (median
        norm of the first tokens' residuals over the rest's), ``pc1_first_cos`` (|cos| of the
        pooled first component with the difference of the two groups' means), ``massive_tokens``
        (how many later tokens ``typical`` leaves out), ``rest_max_norm_ratio`` (the largest later
        residual's norm over the rest's median) and ``rest_max_token`` (its index along ``stack``'s
        token). Attributes ``tokens``, ``first_tokens``, ``massive``.
    """
    stack = stack.compute() if hasattr(stack, "compute") else stack
    if stack.dims == ("token", "d_model"):
        stack = stack.expand_dims(depth=[str(stack.attrs.get("depth", "final"))], axis=1)
    x = np.asarray(stack.values, np.float64)                              # (token, depth, d_model)
    first = np.asarray(stack["pos"].values == 0 if first is None else first, bool)
    n_tok, n_depth, _ = x.shape
    rest = np.flatnonzero(~first)
    n_components = max(1, min(int(n_components), n_tok - 1))
    evr = np.full((n_depth, 3, n_components), np.nan)
    per_depth = {n: np.full(n_depth, np.nan) for n in ("first_share", "first_norm_ratio", "pc1_first_cos",
                                                        "massive_tokens", "rest_max_norm_ratio", "rest_max_token")}
    for d in range(n_depth):
        xd = x[:, d]
        centred = xd - xd.mean(0)
        norms = np.linalg.norm(xd, axis=-1)
        med = max(float(np.median(norms[rest])), 1e-30) if rest.size else 1.0
        typical = ~first & (norms <= massive * med)
        for g, keep in enumerate((np.ones(n_tok, bool), ~first, typical)):
            evr[d, g] = _explained(xd[keep], n_components)
        dev = (centred ** 2).sum(-1)
        per_depth["first_share"][d] = dev[first].sum() / dev.sum() if dev.sum() > 0 else 0.0
        per_depth["massive_tokens"][d] = int((~first & ~typical).sum())
        if rest.size:
            top = rest[np.argmax(norms[rest])]
            per_depth["rest_max_token"][d], per_depth["rest_max_norm_ratio"][d] = top, norms[top] / med
        if first.any() and rest.size:
            per_depth["first_norm_ratio"][d] = np.median(norms[first]) / med
            gap = xd[first].mean(0) - xd[rest].mean(0)
            pc1 = np.linalg.svd(centred, full_matrices=False)[2][0]
            per_depth["pc1_first_cos"][d] = abs(gap @ pc1) / max(np.linalg.norm(gap), 1e-30)
    data = {"explained_variance_ratio": (("depth", "group", "pc"), evr)}
    for name, values in per_depth.items():
        data[name] = (("depth",), values.astype(np.int64) if name in ("massive_tokens", "rest_max_token")
                      and not np.isnan(values).any() else values)
    return xr.Dataset(data, coords={"depth": np.asarray(stack.depth.values).astype(str),
                                    "group": ["all", "rest", "typical"], "pc": np.arange(1, n_components + 1)},
                      attrs={"tokens": int(n_tok), "first_tokens": int(first.sum()), "massive": float(massive),
                             "note": "PCA over tokens pooled across sequences, per depth; rest: first tokens left "
                                     "out; typical: also later tokens with a massive residual left out"})


def residual_pca_scree(pca, *, title: str | None = None) -> Figure:
    """The residual-PCA scree at each depth, all tokens against the first tokens left out.

    One panel per depth: the explained variance ratio of each principal component (log scale), of
    the residuals of all tokens pooled, of the same without the first token of each sequence, and
    (where there are any) without the later tokens whose residual is massive too (see
    :func:`residual_pca` for exactly what is PCA'd). Each panel says what the first tokens alone
    account for: their share of the pooled variance, their residual's norm against the rest's,
    how closely the pooled first component points at them, and the largest later residual.

    Parameters
    ----------
    pca : xarray.Dataset or xarray.DataArray
        A :func:`residual_pca` result, or a residual stack to compute it from.
    title : str, optional
        The figure's title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if isinstance(pca, xr.DataArray):
        pca = residual_pca(pca)
    depths = [str(d) for d in pca.depth.values]
    ncols = min(5, len(depths))
    nrows = -(-len(depths) // ncols)
    fig = Figure(figsize=(3.1 * ncols + 0.6, 3.2 * nrows + 0.7), layout="constrained")
    pcs = pca.pc.values
    styles = {"all": dict(color="#7f7f7f", ls="--", marker="o", label="all tokens"),
              "rest": dict(color="#1f77b4", ls="-", marker="o", label="first tokens left out"),
              "typical": dict(color="#d95f02", ls=":", marker=".", label=f"also > {pca.attrs.get('massive', 5):g}× "
                                                                         "median norm left out")}
    for i, depth in enumerate(depths):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        one = pca.sel(depth=depth)
        for g in [g for g in ("all", "rest", "typical") if g in pca.group.values]:
            if g == "typical" and not int(one.massive_tokens):
                continue                                          # the same tokens as "rest"
            ax.plot(pcs, one.explained_variance_ratio.sel(group=g).values, ms=3, lw=1.3, **styles[g])
        ax.set_yscale("log")
        ax.set_title(depth, fontsize=9)
        ax.set_xlabel("principal component", fontsize=8)
        if i % ncols == 0:
            ax.set_ylabel("explained variance ratio", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if pca.attrs.get("first_tokens"):
            ax.text(0.97, 0.97, f"first tokens: {float(one.first_share):.0%} of the variance\n"
                                f"norm {float(one.first_norm_ratio):.1f}× the rest's\n"
                                f"|cos(PC1, first − rest)| {float(one.pc1_first_cos):.2f}\n"
                                f"largest later token: {float(one.rest_max_norm_ratio):.1f}× median"
                                + (f"\n({int(one.massive_tokens)} massive, left out of the dotted line)"
                                   if int(one.massive_tokens) else ""),
                    transform=ax.transAxes, ha="right", va="top", fontsize=7,
                    bbox=dict(boxstyle="round,pad=0.25", fc="white", ec="#cccccc", alpha=0.9))
    from matplotlib.lines import Line2D

    shown = [g for g in ("all", "rest", "typical") if g in pca.group.values
             and (g != "typical" or int(pca.massive_tokens.max()) > 0)]
    fig.legend([Line2D([], [], ms=3, lw=1.3, **{k: v for k, v in styles[g].items() if k != "label"}) for g in shown],
               [styles[g]["label"] for g in shown], fontsize=7.5, loc="outside lower center", ncols=len(shown),
               frameon=False)
    fig.suptitle(title or f"residual PCA over {pca.attrs.get('tokens', '?'):,} tokens "
                          f"({pca.attrs.get('first_tokens', 0)} first tokens)", fontsize=10)
    return fig


def total_vs_direct(eff: xr.Dataset, *, which: str = "delta_loss", title: str | None = None) -> Figure:
    """Per intervention, the total effect measured on the live model (``streamtap.effects``) against
    the direct effect the store predicts: points on the diagonal act only directly, points above it
    are amplified downstream, below it compensated (the model repairs them).

    Parameters
    ----------
    eff : xarray.Dataset
        An ``effects`` result made with ``store=`` (it has ``direct_<which>``).
    which : str
        ``"delta_loss"``, ``"kl"`` or ``"delta_logit"``.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    if f"direct_{which}" not in eff:
        raise ValueError(f"this effects result has no direct_{which}: call streamtap.effects(..., store=ds)")
    fig = Figure(figsize=(6.4, 5.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    total, direct = eff[which].values, eff[f"direct_{which}"].values
    kinds = eff["kind"].values
    for kind in dict.fromkeys(kinds):
        sel = (kinds == kind) & np.isfinite(direct)
        ax.scatter(direct[sel], total[sel], s=18, alpha=0.75, label=str(kind))
    finite = np.concatenate([total[np.isfinite(total)], direct[np.isfinite(direct)]])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls=":")
    top = np.argsort(-np.abs(np.nan_to_num(total)))[:6]
    for i in top:
        if np.isfinite(direct[i]):
            ax.annotate(str(eff["intervention"].values[i]), (direct[i], total[i]), fontsize=7)
    ax.set_xlabel(f"direct ({which}, store, patterns and norms frozen)")
    ax.set_ylabel(f"total ({which}, live model)")
    ax.legend(fontsize=8)
    ax.set_title(title or "total against direct effect per intervention", fontsize=10)
    return fig
