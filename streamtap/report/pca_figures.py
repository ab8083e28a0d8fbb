"""The residual-PCA scree: what PCA of the residual pooled over tokens explains at each depth, with and
without the first tokens (``residual_pca``), and its figure. Also importable from
``streamtap.report.figures``."""

from __future__ import annotations

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


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
        One panel per depth, with a shared legend.
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
