"""Mixtures of experts: Mixtral, and Qwen2-MoE with its gated shared expert.

The MLP term of a layer splits into one term per expert actually routed to, weighted by its
router weight (and the shared expert's term), so a researcher can ask which expert wrote what.
"""

from .spec import INPUT, Attn, Layout, Moe, projections, sliding_window

ATTN = Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"), window=sliding_window)

LAYOUTS = [
    Layout(
        name="mixtral",
        model_types=("mixtral",),
        embeds={"embed": "embed_tokens"},
        layers="layers",
        block=(ATTN, Moe("mlp", experts="mlp.experts")),
        resid_final=("norm", INPUT),
        final_norm="norm",
    ),
    Layout(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        embeds={"embed": "embed_tokens"},
        layers="layers",
        block=(ATTN, Moe("mlp", experts="mlp.experts", shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate")),
        resid_final=("norm", INPUT),
        final_norm="norm",
    ),
]
