"""BLOOM: a LayerNorm on the embeddings, and sublayers that add the residual inside their forward.

Because BloomAttention and BloomMLP return residual + term, the terms come from their inner
projections (``dense``, ``dense_4h_to_h``). The stream starts at the embedding norm's output.
With ``apply_residual_connection_post_layernorm`` the residual itself is the normed value, so
the stream passes through each input norm: exact all the same, with the norms' scales frozen.
"""

from .spec import INPUT, Attn, Layout, Mlp, Norm

# queries, keys and values fused per head, [head, (q, k, v), d_head]; positions enter as ALiBi biases
ATTN = Attn("self_attention.dense", qkv="self_attention.query_key_value", split="per_group", norm="input_layernorm",
            scale="inv_norm_factor", notes=("ALiBi biases are added to the scores by query-key distance",),
            alibi="alibi")

_COMMON = dict(
    model_types=("bloom",),
    embeds={"embed": "word_embeddings_layernorm"},
    layers="h",
    resid_final=("ln_f", INPUT),
    final_norm="ln_f",
    positions="alibi",
)

LAYOUTS = [
    Layout(
        name="bloom-post-ln-residual",
        when=lambda config: getattr(config, "apply_residual_connection_post_layernorm", False),
        block=(Norm("input_layernorm"), ATTN,   # the MLP reads the stream itself, normalised just before
               Norm("post_attention_layernorm"), Mlp("mlp.dense_4h_to_h", up="mlp.dense_h_to_4h")),
        **_COMMON,
    ),
    Layout(
        name="bloom",
        block=(ATTN, Mlp("mlp.dense_4h_to_h", up="mlp.dense_h_to_4h", norm="post_attention_layernorm")),
        **_COMMON,
    ),
]
