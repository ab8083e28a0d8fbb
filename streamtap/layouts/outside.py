"""Blocks that add to the stream outside the modules a tap reads.

GPT-NeoX-Japanese: a sequential pre-LN block (not GPT-NeoX's parallel one) whose last layer adds a
bias parameter of its attention (``attention.dense_bias``) to the output of ``dense`` in the block's
own code; the stored attention bias carries it (``Attn(out_bias=...)``). Its fused projection is laid
out per head, [head, (q, k, v), d_head], and scores are divided by ``norm_factor``.
"""

from .spec import INPUT, Attn, Layout, Mlp

LAYOUTS = [
    Layout(
        name="gpt_neox_japanese",
        model_types=("gpt_neox_japanese",),
        embeds={"embed": "embed_in"},
        layers="layers",
        block=(Attn("attention.dense", qkv="attention.query_key_value", split="per_group", norm="input_layernorm",
                    scale=lambda attn: 1.0 / attn.norm_factor, out_bias="attention.dense_bias"),
               Mlp("mlp", down="mlp.dense_4h_to_h", up="mlp.dense_h_to_4h", norm="post_attention_layernorm",
                   act="hidden_act")),
        resid_final=("final_layer_norm", INPUT),
        final_norm="final_layer_norm",
    ),
]
