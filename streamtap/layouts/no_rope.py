"""Llama-named models with no-rope layers: SmolLM3.

Every layer receives the same rotary tables, but a layer whose attention keeps ``use_rope`` false
(``config.no_rope_layers``) leaves its queries and keys unturned; the layout declares that per
layer (``rotates``), the store records it (``rotary_layers``) and recomputed patterns follow it.
"""

from .spec import INPUT, Attn, Layout, Mlp, projections, sliding_window, uses_rope

LAYOUTS = [
    Layout(name="smollm3", model_types=("smollm3",), embeds={"embed": "embed_tokens"}, layers="layers",
           block=(Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"), window=sliding_window,
                       rotates=uses_rope),
                  Mlp("mlp", down="mlp.down_proj", up="mlp.up_proj", gate="mlp.gate_proj",
                      norm="post_attention_layernorm", act="hidden_act")),
           resid_final=("norm", INPUT), final_norm="norm"),
]
