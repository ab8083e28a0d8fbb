"""GPT-Neo: GPT-2's stream with the attention one module deeper (``attn.attention``).

Its attention does not scale scores by 1/sqrt(d_head), hence ``scale=1.0``.
"""

from .spec import INPUT, Attn, Layout, Mlp, projections

LAYOUTS = [
    Layout(
        name="gpt_neo",
        model_types=("gpt_neo",),
        embeds={"embed": "wte", "pos_embed": "wpe"},
        layers="h",
        block=(Attn("attn.attention.out_proj", norm="ln_1", scale=1.0, **projections("attn.attention")),
               Mlp("mlp", down="mlp.c_proj")),
        resid_final=("ln_f", INPUT),
        final_norm="ln_f",
        positions="learned",
    ),
]
