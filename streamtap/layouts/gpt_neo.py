"""GPT-Neo: GPT-2's stream with the attention one module deeper (``attn.attention``)."""

from .base import INPUT, Attn, Layout, Mlp

LAYOUTS = [
    Layout(
        name="gpt_neo",
        model_types=("gpt_neo",),
        embeds={"embed": "wte", "pos_embed": "wpe"},
        layers="h",
        block=(Attn("attn.attention.out_proj"), Mlp("mlp", down="mlp.c_proj")),
        resid_final=("ln_f", INPUT),
        final_norm="ln_f",
    ),
]
