"""GPT-2 and GPT-BigCode (multi-query): learned positions, LayerNorm, biases on every projection."""

from .base import INPUT, Attn, Layout, Mlp

LAYOUTS = [
    Layout(
        name="gpt2",
        model_types=("gpt2", "gpt_bigcode"),
        embeds={"embed": "wte", "pos_embed": "wpe"},
        layers="h",
        block=(Attn("attn.c_proj"), Mlp("mlp", down="mlp.c_proj")),
        resid_final=("ln_f", INPUT),
        final_norm="ln_f",
    ),
]
