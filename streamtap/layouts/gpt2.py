"""GPT-2 and GPT-BigCode (multi-query): learned positions, LayerNorm, biases on every projection.

Both fuse queries, keys and values into ``attn.c_attn``, laid out differently: GPT-2 puts all query
heads, then all key heads, then all value heads side by side; GPT-BigCode groups them per key/value
head (which, with multi-query attention's single key/value head, is the same thing).
"""

from .spec import INPUT, Attn, Layout, Mlp

_COMMON = dict(
    embeds={"embed": "wte", "pos_embed": "wpe"},
    layers="h",
    resid_final=("ln_f", INPUT),
    final_norm="ln_f",
    positions="learned",
)

LAYOUTS = [
    Layout(
        name="gpt2",
        model_types=("gpt2",),
        block=(Attn("attn.c_proj", qkv="attn.c_attn", split="concat", norm="ln_1"),
               Mlp("mlp", down="mlp.c_proj", up="mlp.c_fc", norm="ln_2", act="activation_function")),
        **_COMMON,
    ),
    Layout(
        name="gpt_bigcode",
        model_types=("gpt_bigcode",),
        block=(Attn("attn.c_proj", qkv="attn.c_attn", split="per_group", norm="ln_1"),
               Mlp("mlp", down="mlp.c_proj", up="mlp.c_fc", norm="ln_2", act="activation_function")),
        **_COMMON,
    ),
]
