"""Architecture knowledge, one small declarative file per family, and nothing outside this package.

Adding a model is adding a file: declare ``LAYOUTS = [Layout(...)]`` in a module here and list the
module in ``_FAMILIES`` (docs/layouts.md). ``layout_for(model)`` picks the layout of a live model;
``bind`` resolves it against the model; ``Weights`` reads the static weights a store keeps.
"""

from __future__ import annotations

from importlib import import_module

from ..errors import UnsupportedArchitectureError
from .bind import BoundLayout, bind
from .spec import INPUT, OUTPUT, POSITIONS, SPLITS, Attn, InputOf, Layout, Mixer, Mlp, Moe, Norm, Scale, projections
from .weights import Weights, in_out_weight

_FAMILIES = ("gpt2", "gpt_neo", "llama", "post_sublayer_norm", "parallel", "bloom", "opt", "bert", "bart", "classic", "moe", "no_rope",
             "hybrid", "falcon_h1", "ssm", "scaled", "fused", "outside", "reused", "gated", "moe_outside")

GUIDE = "docs/layouts.md"

LAYOUTS: list[Layout] = [layout for family in _FAMILIES
                         for layout in import_module(f"{__name__}.{family}").LAYOUTS]

REFUSED: dict[str, str] = {t: why for family in _FAMILIES
                           for t, why in getattr(import_module(f"{__name__}.{family}"), "REFUSED", {}).items()}
"""model_type -> why no layout can make it exact (a family file's ``REFUSED``); a registered layout still wins."""


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
        # an inferred layout's queries and keys count once the self-check proved its patterns equal the
        # model's (``tapping.self_check.prove_attention``): a float, the error it measured; else why not
        proof = getattr(bound, "attention_proof", None)
        if not isinstance(proof, float):
            return ("its layout was inferred (no family file names this model type), and "
                    + (proof or "the attach-time self-check has not proven where its queries and keys come from")
                    + f" (see {GUIDE})")
    step = bound.attn
    if step is not None and step.no_patterns:
        return step.no_patterns
    if bound.mixer_layers and not bound.attn_layers:
        return ("it has no attention: every layer is a state-space mixer, which has no attention pattern "
                "(a store keeps each mixer's output as one term)")
    if bound.mixer_layers:
        return (f"it is a hybrid model: layers {bound.mixer_layers} are state-space, convolution or linear-attention "
                "mixers, which have no attention pattern, and a store keeps its mixers' outputs only (one term per "
                "layer), not the query/key weights a pattern is recomputed from")
    if step is None or not (step.q or step.qkv):
        return f"layout {bound.name!r} does not locate the attention's queries and keys"
    why = step.unsupported(bound.config) if step.unsupported else None
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
    # a multimodal model whose text tower is a family's (GOT-OCR2's Qwen2): that family's layout, on the tower
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config and model_type not in REFUSED:
        for layout in LAYOUTS:
            if text.model_type in layout.model_types and (layout.when is None or layout.when(text)):
                return layout
    raise _unsupported(model)


def layout_candidates(model) -> list[Layout]:
    """The layouts a tap may use for ``model``: its family layout alone where one matches (a family
    file always wins), else the layouts inferred from its module tree (``layouts/infer.py``), which
    the tap accepts only when the self-check proves one exact.

    Raises
    ------
    UnsupportedArchitectureError
        No family layout matches and the module tree is not one inference can read.
    """
    varying = _sizes_per_layer(model)
    if varying:
        raise UnsupportedArchitectureError(
            f"streamtap cannot tap {type(model).__name__} (model_type {model.config.model_type!r}): its layers differ "
            f"in {', '.join(varying)} (a heterogeneous config: per_layer_config sets them layer by layer), and a "
            "store lays out every layer with the same sizes (one head count and head width for W_O and z). "
            "Capture another architecture")
    try:
        return [layout_for(model)]
    except UnsupportedArchitectureError:
        if getattr(getattr(model, "config", None), "model_type", None) in REFUSED:
            raise   # a structure no layout makes exact is not guessed at either
    from .infer import candidates

    found = candidates(model)
    if not found:
        raise _unsupported(model, " Its module tree is not a stack of attention and MLP blocks that streamtap could "
                                  "infer a layout from.")
    return found


# the sizes a store lays every layer out by; a config that sets them per layer cannot be stored
_STORE_SIZES = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "v_head_dim")


def _sizes_per_layer(model) -> list[str]:
    """The store's sizes a heterogeneous config (transformers' ``per_layer_config``) sets per layer."""
    config = getattr(model, "config", None)
    configs = [config] + [getattr(config, k, None) for k in ("text_config",)] if config is not None else []
    fields = set()
    for c in configs:
        overrides = c.to_dict().get("per_layer_config") if hasattr(c, "to_dict") else None
        for layer in (overrides or {}).values():
            fields.update(k for k in layer or {} if k in _STORE_SIZES)
    return sorted(fields)


def _unsupported(model, why: str = "") -> UnsupportedArchitectureError:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        return UnsupportedArchitectureError(
            f"streamtap cannot decompose {type(model).__name__} (model_type {model_type!r}) exactly: "
            f"{REFUSED[model_type]}. Capture another architecture, or register a layout of your own "
            f"(streamtap.layouts.register, see {GUIDE}) if you accept another split of its terms."
        )
    if model_type in supported_model_types():   # declared, but each of its layouts is for another configuration
        return UnsupportedArchitectureError(
            f"streamtap's layouts for model_type {model_type!r} do not cover this configuration of "
            f"{type(model).__name__} (each declares the configurations it fits; see docs/architectures.md for what "
            f"they cover). Register a layout of your own for it (streamtap.layouts.register, see {GUIDE})." + why)
    return UnsupportedArchitectureError(
        f"streamtap has no layout for model_type {model_type!r} ({type(model).__name__}). "
        f"Supported model types: {', '.join(supported_model_types())}. "
        f"To add one, write a few-line Layout declaring where its terms live (see {GUIDE}) "
        "and register it with streamtap.layouts.register(...)." + why
    )


__all__ = ["INPUT", "OUTPUT", "POSITIONS", "REFUSED", "SPLITS", "Attn", "BoundLayout", "InputOf", "Layout", "LAYOUTS", "Mixer", "Mlp", "Moe", "Norm", "Scale",
           "Weights", "bind", "in_out_weight", "layout_candidates", "layout_for", "pattern_support", "projections", "register", "supported_model_types"]
