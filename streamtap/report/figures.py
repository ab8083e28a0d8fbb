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
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ._draw import DIVERGING, _ids_text, _show, _symmetric, _tick_step
from .pattern_figures import SCORE_NAMES, attention_heatmap, head_score_grid
from .pca_figures import residual_pca, residual_pca_scree

# the pattern and PCA figures live in their own modules; every figure stays importable from here
__all__ = ["save", "png_bytes", "overflowing_text", "contribution_heatmap", "logit_lens_table", "pick_heads",
           "token_maps", "effective_rank_bars", "message_norm_distribution", "attention_heatmap", "head_score_grid",
           "SCORE_NAMES", "logit_lens_grid", "residual_pca", "residual_pca_scree", "total_vs_direct"]


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
        The layer x head grid with the bias and MLP columns beside it, and its colour bar.

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
    step = _tick_step(n_layers, 32)
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
        One row per depth, one column per rank.

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
        One panel per head, on a shared colour scale.
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
        Two panels over the layers: the query-key and the value-output matrices.
    """
    var = {"entropy": "erank_entropy", "energy": "erank_energy"}[definition]
    groups = (("W_Q", "W_K", "W_QK"), ("W_V", "W_O", "W_OV"))
    layers = er.layer.values
    # lines with min-max bands: readable at any depth in a fixed width (bars grew with the layers)
    fig = Figure(figsize=(10, 5.6), layout="constrained")
    colors = {"W_Q": "#9ecae1", "W_K": "#4292c6", "W_QK": "#08306b", "W_V": "#fdae6b", "W_O": "#e6550d",
              "W_OV": "#7f2704"}
    step = _tick_step(len(layers), 16)
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
        The per-layer violins on the left, the layer x head share map on the right.
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
    step = _tick_step(n_layers, 15)
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
    ax2.set_xticks(range(0, n_heads, _tick_step(n_heads, 16)))
    ax2.set_yticks(range(0, n_layers, step))
    fig.colorbar(im, ax=ax2, shrink=0.8, label=label)
    fig.suptitle(title or f"source-message norms over {rel.shape[0]:,} tokens ({int(first.sum())} first tokens "
                 "shown apart)", fontsize=10)
    return fig


# -- 6. logit lens over a passage --------------------------------------------------------------------
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
        One column per position, one row per depth.

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
    step = _tick_step(n_depth, 40)
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
