"""BLOOM: a LayerNorm on the embeddings, and sublayers that add the residual inside their forward.

Because BloomAttention and BloomMLP return residual + term, the terms come from their inner
projections (``dense``, ``dense_4h_to_h``). The stream starts at the embedding norm's output.
With ``apply_residual_connection_post_layernorm`` the residual itself is the normed value, so
the stream passes through each input norm: exact all the same, with the norms' scales frozen.
"""

from .base import INPUT, Attn, Layout, Mlp, Norm

_COMMON = dict(
    model_types=("bloom",),
    embeds={"embed": "word_embeddings_layernorm"},
    layers="h",
    resid_final=("ln_f", INPUT),
    final_norm="ln_f",
)

LAYOUTS = [
    Layout(
        name="bloom-post-ln-residual",
        when=lambda config: getattr(config, "apply_residual_connection_post_layernorm", False),
        block=(Norm("input_layernorm"), Attn("self_attention.dense"),
               Norm("post_attention_layernorm"), Mlp("mlp.dense_4h_to_h")),
        **_COMMON,
    ),
    Layout(
        name="bloom",
        block=(Attn("self_attention.dense"), Mlp("mlp.dense_4h_to_h")),
        **_COMMON,
    ),
]
