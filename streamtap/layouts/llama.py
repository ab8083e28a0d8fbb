"""The Llama family: rotary positions, RMSNorm, grouped-query attention, optional biases.

Mistral and Qwen2 (q/k/v biases) keep Llama's module names; biases on o_proj and down_proj
(``attention_bias``/``mlp_bias``) are read when present and stored as zeros when absent.
"""

from .base import Layout

LAYOUT = Layout(
    name="llama",
    model_types=("llama", "mistral", "qwen2"),
    embed="embed_tokens",
    layers="layers",
    attn_out="self_attn.o_proj",
    mlp="mlp",
    mlp_down="mlp.down_proj",
    final_norm="norm",
    final_norm_kind="rmsnorm",
)
