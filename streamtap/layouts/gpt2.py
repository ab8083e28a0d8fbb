"""GPT-2: learned positions, Conv1D weights, biases on every projection, LayerNorm."""

from .base import Layout

LAYOUT = Layout(
    name="gpt2",
    model_types=("gpt2",),
    embed="wte",
    pos_embed="wpe",
    layers="h",
    attn_out="attn.c_proj",
    mlp="mlp",
    mlp_down="mlp.c_proj",
    final_norm="ln_f",
    final_norm_kind="layernorm",
)
