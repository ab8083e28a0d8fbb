"""Llama-shaped families with other module names: Phi-3 (fused query/key/value and gate/up
projections) and StarCoder2 (LayerNorm with biases, ``c_fc``/``c_proj`` MLP, sliding windows).

Phi-3's ``qkv_proj`` concatenates all query heads, then all key heads, then all value heads.
"""

from .spec import INPUT, Attn, Layout, Mlp, projections, sliding_window

_NAMES = dict(embeds={"embed": "embed_tokens"}, layers="layers", resid_final=("norm", INPUT), final_norm="norm")

LAYOUTS = [
    Layout(
        name="phi3",
        model_types=("phi3",),
        **_NAMES,
        block=(Attn("self_attn.o_proj", qkv="self_attn.qkv_proj", split="concat", norm="input_layernorm",
                    window=sliding_window),
               Mlp("mlp", down="mlp.down_proj", gate_up="mlp.gate_up_proj", norm="post_attention_layernorm",
                   act="hidden_act")),
    ),
    Layout(
        name="starcoder2",
        model_types=("starcoder2",),
        **_NAMES,
        block=(Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"), window=sliding_window),
               Mlp("mlp", down="mlp.c_proj", up="mlp.c_fc", norm="post_attention_layernorm", act="hidden_act")),
    ),
]
