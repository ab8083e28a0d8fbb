"""GPT-Neo: GPT-2's stream with the attention one module deeper (``attn.attention``).

Its attention does not scale scores by 1/sqrt(d_head), hence ``scale=1.0``; its "local" layers see
only the last ``window_size`` positions.
"""

from .spec import INPUT, Attn, Layout, Mlp, projections



def _local_window(config, attention) -> int | None:
    return config.window_size if getattr(attention, "attention_type", None) == "local" else None


LAYOUTS = [
    Layout(
        name="gpt_neo",
        model_types=("gpt_neo",),
        embeds={"embed": "wte", "pos_embed": "wpe"},
        layers="h",
        block=(Attn("attn.attention.out_proj", norm="ln_1", scale=1.0, **projections("attn.attention"),
                    window=_local_window),
               Mlp("mlp", down="mlp.c_proj", up="mlp.c_fc", norm="ln_2", act="activation_function")),
        resid_final=("ln_f", INPUT),
        final_norm="ln_f",
        positions="learned",
    ),
]
