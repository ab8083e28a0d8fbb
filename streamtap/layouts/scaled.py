"""Llama-shaped families whose stream differs by a multiplier or a shared norm: Granite, Cohere, Cohere2.

Granite multiplies the token embedding (``embedding_multiplier``) and every sublayer's write
(``residual_multiplier``) outside the modules a capture taps, scales the attention scores by
``attention_multiplier`` (the attention's ``scaling``) and divides the logits by ``logits_scaling``.
Cohere runs attention and MLP in parallel on one shared norm (``input_layernorm`` read by both),
rotates interleaved pairs of dimensions and multiplies the logits by ``logit_scale``. The stored
terms include the multipliers (``Layout.embed_scale``...), so the stream adds up as the model adds it.
"""

from .spec import INPUT, Attn, Layout, Mlp, Reciprocal, projections, sliding_window

_COHERE_NOTES = (("use_qk_norm", "queries and keys pass through per-head LayerNorms (not recomputed offline)"),)


def _qk_norms(config) -> str | None:
    return "its per-head query and key norms are not recomputed offline" if getattr(config, "use_qk_norm", False) else None


def _global_layers_without_rope(config) -> str | None:
    if "full_attention" in (getattr(config, "layer_types", None) or ()):
        return ("its full-attention layers skip the rotary embedding that its sliding layers apply, which the "
                "offline attention does not model")
    return None


_NAMES = dict(embeds={"embed": "embed_tokens"}, layers="layers", resid_final=("norm", INPUT), final_norm="norm")

LAYOUTS = [
    Layout(
        name="granite",
        model_types=("granite",),
        **_NAMES,
        block=(Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn")),
               Mlp("mlp", down="mlp.down_proj")),
        embed_scale="embedding_multiplier",
        residual_scale="residual_multiplier",
        logit_scale=Reciprocal("logits_scaling"),
    ),
    *(Layout(
        name=name,
        model_types=(name,),
        **_NAMES,
        block=(Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"), rotary="interleaved",
                    window=sliding_window, notes=_COHERE_NOTES, unsupported=unsupported),
               Mlp("mlp", down="mlp.down_proj")),   # parallel: the MLP reads the same input_layernorm
        logit_scale="logit_scale",
    ) for name, unsupported in (("cohere", _qk_norms), ("cohere2", _global_layers_without_rope))),
]
