"""What a selective store kept (``layers``, ``heads``, ``terms``, ``positions``, ``project``), read without torch.

The capture side (``streamtap.tapping.select``) writes the selection and the per-token ``rest`` term;
``decompose``, ``verify`` and the analyses read them through these helpers.
"""

from __future__ import annotations

import json

REST = ("rest", "rest", -1, -1, -1)
"""The label of the per-token term that holds everything a selective capture did not store."""


def covered(label: tuple, layers, heads, kinds) -> bool:
    """Whether a component (decompose's label tuple) is kept by a selection; norm betas always are."""
    _, kind, layer, head, _ = label
    if kind == "norm_beta":
        return True
    if layer < 0:   # an embedding term
        return "embed" in kinds
    if layers is not None and layer not in layers:
        return False
    if kind == "head":
        return "z" in kinds and (heads is None or head in heads)
    if kind == "attn_bias":
        return "z" in kinds
    return "mlp_out" in kinds   # an MLP's or a mixer's output


def selection_of(attrs: dict) -> dict | None:
    """A store's recorded selection (``layers``, ``heads``, ``terms``, ``positions``, ``project``), or None."""
    text = attrs.get("selection")
    return json.loads(text) if text else None


__all__ = ["REST", "covered", "selection_of"]
