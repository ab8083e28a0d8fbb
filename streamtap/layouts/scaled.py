"""Llama-shaped families whose stream differs by a multiplier or a shared norm: Granite (and its mixtures
of experts), Cohere, Cohere2, MiniCPM3.

Granite multiplies the token embedding (``embedding_multiplier``) and every sublayer's write
(``residual_multiplier``) outside the modules a capture taps, scales the attention scores by
``attention_multiplier`` (the attention's ``scaling``) and divides the logits by ``logits_scaling``.
Cohere runs attention and MLP in parallel on one shared norm (``input_layernorm`` read by both),
rotates interleaved pairs of dimensions by tables that hold each pair's angle twice
(``rotary="interleaved_repeated"``) and multiplies the logits by ``logit_scale``. The stored
terms include the multipliers (``Layout.embed_scale``...), so the stream adds up as the model adds it.
Granite-MoE (and Granite-MoE-SWA, whose patterns are refused)'s routed and shared experts carry the residual multiplier in each stored share. MiniCPM3
is muP-scaled: ``scale_emb`` inside its embedding module (the tapped output has it), ``scale_depth / sqrt(num_hidden_layers)`` on every
write, logits divided by ``hidden_size / dim_model_base``; its latent attention is DeepSeek's.
"""

import dataclasses
import math

from .moe import MLA
from .spec import INPUT, Attn, Layout, Mlp, Moe, Reciprocal, projections, sliding_window

_COHERE_NOTES = (("use_qk_norm", "queries and keys pass through per-head LayerNorms (not recomputed offline)"),)


def _qk_norms(config) -> str | None:
    return "its per-head query and key norms are not recomputed offline" if getattr(config, "use_qk_norm", False) else None


def _global_layers_without_rope(config) -> str | None:
    if "full_attention" in (getattr(config, "layer_types", None) or ()):
        return ("its full-attention layers skip the rotary embedding that its sliding layers apply, which the "
                "offline attention does not model")
    return None


def _depth_scale(config) -> float:
    """MiniCPM's muP residual multiplier: ``scale_depth / sqrt(num_hidden_layers)``."""
    return float(config.scale_depth) / math.sqrt(config.num_hidden_layers)


_GRANITE_SCALES = dict(embed_scale="embedding_multiplier", residual_scale="residual_multiplier",
                       logit_scale=Reciprocal("logits_scaling"))
_GRANITE_ATTN = Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"), window=sliding_window)
# Granite-MoE-SWA: learned sinks, and a rotary base per layer (layer_rope_theta, 0 for no rotation)
_GRANITE_SWA_ATTN = dataclasses.replace(_GRANITE_ATTN, no_patterns=(
    "each layer has a rotary base of its own (layer_rope_theta; 0 turns rotation off) and learned attention sinks, "
    "which the offline attention does not read"))
_GATED = dict(up="mlp.up_proj", gate="mlp.gate_proj", norm="post_attention_layernorm", act="hidden_act")
_NAMES = dict(embeds={"embed": "embed_tokens"}, layers="layers", resid_final=("norm", INPUT), final_norm="norm")

LAYOUTS = [
    Layout(
        name="granite",
        model_types=("granite",),
        **_NAMES,
        block=(Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn")),
               Mlp("mlp", down="mlp.down_proj", **_GATED)),
        **_GRANITE_SCALES,
    ),
    # the shared MLP is the block's own (beside block_sparse_moe), and both writes are scaled together
    *(Layout(
        name=name,
        model_types=(name,),
        **_NAMES,
        block=(attn, Moe("block_sparse_moe", experts="block_sparse_moe.experts", shared=shared)),
        **_GRANITE_SCALES,
    ) for name, shared, attn in (("granitemoe", None, _GRANITE_ATTN), ("granitemoeshared", "shared_mlp", _GRANITE_ATTN),
                                 ("granitemoe_swa", "shared_mlp", _GRANITE_SWA_ATTN))),
    Layout(
        name="minicpm3",
        model_types=("minicpm3",),
        **_NAMES,
        block=(Attn("self_attn.o_proj", norm="input_layernorm", d_head="v_head_dim", no_patterns=MLA),
               Mlp("mlp", down="mlp.down_proj", **_GATED)),
        residual_scale=_depth_scale,   # scale_emb is applied inside its embedding module, so the tap sees it
        logit_scale=Reciprocal("logits_scaling"),
    ),
    *(Layout(
        name=name,
        model_types=(name,),
        **_NAMES,
        block=(Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"), rotary="interleaved_repeated",
                    window=sliding_window, notes=_COHERE_NOTES, unsupported=unsupported),
               Mlp("mlp", down="mlp.down_proj", up="mlp.up_proj", gate="mlp.gate_proj", norm="input_layernorm",
                   parallel=True, act="hidden_act")),   # parallel: the MLP reads the same input_layernorm
        logit_scale="logit_scale",
    ) for name, unsupported in (("cohere", _qk_norms), ("cohere2", _global_layers_without_rope))),
]
