"""What the figure modules share: how token text is shown, the diverging colour norm, and how many tick
labels an axis gets."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import TwoSlopeNorm

DIVERGING = "RdBu_r"


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


def _tick_step(n: int, max_labels: int) -> int:
    """Every how many of ``n`` ticks (tokens, layers, heads) a label goes, so that at most ``max_labels`` are
    written: every figure thins its axis labels the same way."""
    return max(1, -(-n // max(1, max_labels)))
