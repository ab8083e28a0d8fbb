"""Architecture knowledge, one small declarative file per family, and nothing outside this package.

Adding a model is adding a file: declare ``LAYOUTS = [Layout(...)]`` in a module here and list the
module in ``_FAMILIES`` (docs/layouts.md). ``layout_for(model)`` picks the layout of a live model;
``bind`` resolves it against the model; ``Weights`` reads the static weights a store keeps.
"""

from __future__ import annotations

from importlib import import_module

from ..errors import UnsupportedArchitectureError
from .bind import BoundLayout, bind
from .spec import INPUT, OUTPUT, POSITIONS, SPLITS, Attn, Layout, Mixer, Mlp, Moe, Norm, projections
from .weights import Weights, in_out_weight

_FAMILIES = ("gpt2", "gpt_neo", "llama", "post_sublayer_norm", "parallel", "bloom", "opt", "bert", "moe", "hybrid",
             "scaled", "fused")

GUIDE = "docs/layouts.md"

LAYOUTS: list[Layout] = [layout for family in _FAMILIES
                         for layout in import_module(f"{__name__}.{family}").LAYOUTS]


REFUSALS: dict[str, str] = {model_type: why for family in _FAMILIES
                            for model_type, why in getattr(import_module(f"{__name__}.{family}"), "REFUSALS", {}).items()}
"""Model types a family file declares it cannot tap exactly, with why: refused by name, never inferred."""


def _refused(model) -> UnsupportedArchitectureError | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    why = REFUSALS.get(model_type)
    if why is None:
        return None
    return UnsupportedArchitectureError(f"streamtap cannot tap model_type {model_type!r} ({type(model).__name__}) "
                                        f"exactly: {why}")


def supported_model_types() -> list[str]:
    """Every ``model_type`` a layout declares, sorted."""
    return sorted({t for layout in LAYOUTS for t in layout.model_types})


def register(layout: Layout) -> Layout:
    """Add a layout at run time (for a family outside this package); it takes precedence.

    Parameters
    ----------
    layout : Layout
        The declaration (docs/layouts.md); every tap checks it on the live model when it opens.

    Returns
    -------
    Layout
        ``layout`` itself.
    """
    LAYOUTS.insert(0, layout)
    return layout


def pattern_support(bound: BoundLayout) -> str | None:
    """Why a bound layout's attention patterns cannot be recomputed from a store, or None."""
    if bound.layout.inferred:
        return ("its layout was inferred (no family file names this model type), and the attach-time self-check "
                "proves the terms but not where the queries and keys come from; a family file declares them "
                f"(see {GUIDE})")
    step = bound.attn
    if step is not None and step.no_patterns:
        return step.no_patterns
    if bound.mixer_layers:
        return (f"it is a hybrid model: layers {bound.mixer_layers} are state-space, convolution or linear-attention "
                "mixers, which have no attention pattern, and a store keeps its mixers' outputs only (one term per "
                "layer), not the query/key weights a pattern is recomputed from")
    if step is None or not (step.q or step.qkv):
        return f"layout {bound.name!r} does not locate the attention's queries and keys"
    why = step.unsupported(bound.model.config) if step.unsupported else None
    if why:
        return why
    if bound.positions() == "alibi" and not step.alibi:
        return ("its ALiBi biases are folded into the attention mask, which a capture does not keep, instead of "
                "reaching each block as an input")
    return None


def layout_for(model) -> Layout:
    """The layout of a live model, by its config's ``model_type`` (and the layout's ``when``).

    Parameters
    ----------
    model : torch.nn.Module
        A transformers model.

    Returns
    -------
    Layout

    Raises
    ------
    UnsupportedArchitectureError
        Listing the supported model types and how to add one.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for layout in LAYOUTS:
        if model_type in layout.model_types and (layout.when is None or layout.when(config)):
            return layout
    raise _refused(model) or _unsupported(model)


def layout_candidates(model) -> list[Layout]:
    """The layouts a tap may use for ``model``: its family layout alone where one matches (a family
    file always wins), else the layouts inferred from its module tree (``layouts/infer.py``), which
    the tap accepts only when the self-check proves one exact.

    Raises
    ------
    UnsupportedArchitectureError
        No family layout matches and the module tree is not one inference can read.
    """
    try:
        return [layout_for(model)]
    except UnsupportedArchitectureError:
        refused = _refused(model)
        if refused is not None:   # a family file said why no layout can be exact: nothing to infer
            raise refused from None
    from .infer import candidates

    found = candidates(model)
    if not found:
        raise _unsupported(model, " Its module tree is not a stack of attention and MLP blocks that streamtap could "
                                  "infer a layout from.")
    return found


def _unsupported(model, why: str = "") -> UnsupportedArchitectureError:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return UnsupportedArchitectureError(
        f"streamtap has no layout for model_type {model_type!r} ({type(model).__name__}). "
        f"Supported model types: {', '.join(supported_model_types())}. "
        f"To add one, write a few-line Layout declaring where its terms live (see {GUIDE}) "
        "and register it with streamtap.layouts.register(...)." + why
    )


__all__ = ["INPUT", "OUTPUT", "POSITIONS", "REFUSALS", "SPLITS", "Attn", "BoundLayout", "Layout", "LAYOUTS", "Mixer", "Mlp", "Moe", "Norm",
           "Weights", "bind", "in_out_weight", "layout_candidates", "layout_for", "pattern_support", "projections", "register", "supported_model_types"]
