"""BLOOM: a LayerNorm on the embeddings, and sublayers that add the residual inside their forward.

Because BloomAttention and BloomMLP return residual + term, the terms come from their inner
projections (``dense``, ``dense_4h_to_h``). The stream starts at the embedding norm's output.
With ``apply_residual_connection_post_layernorm`` the residual itself is the normed value, so
the stream passes through each input norm: exact all the same, with the norms' scales frozen.

MPT is the same kind of block without the embedding norm: its MLP (``ffn``) returns residual + term,
so the term is ``ffn.down_proj``'s output. Its ALiBi table is one (head, 1, max_seq_len) tensor by key
index from the end of the sequence, the same for every sequence of a batch, not a per-token input a
capture could store, so its patterns are not recomputed.
"""

from .spec import INPUT, Attn, Layout, Mlp, Norm

_MPT_ALIBI = ("MPT adds its ALiBi biases from one table by key index counted from the end of the sequence "
              "(position_bias, the same for every sequence, padding included), which a store does not keep")

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
    Layout(
        name="mpt",
        model_types=("mpt",),
        embeds={"embed": "wte"},
        layers="blocks",
        # Wqkv is [all query heads | all key heads | all value heads]; the MLP adds the residual itself
        block=(Attn("attn.out_proj", qkv="attn.Wqkv", split="concat", norm="norm_1", scale="softmax_scale",
                    notes=("ALiBi biases are added to the scores by query-key distance",
                           "queries, keys and values are clipped where attn_config.clip_qkv is set"),
                    no_patterns=_MPT_ALIBI),
               Mlp("ffn.down_proj", up="ffn.up_proj", norm="norm_2")),
        resid_final=("norm_f", INPUT),
        final_norm="norm_f",
        positions="alibi",
        max_positions=("max_seq_len",),
    ),
]
