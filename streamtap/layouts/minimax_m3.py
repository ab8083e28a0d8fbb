"""MiniMax-M3's text stack: Llama-named blocks whose mixture multiplies the routed experts' sum by
``routed_scaling_factor`` outside its fused experts, then adds an always-on shared expert
(``Moe(routed_scale=...)``); layers ``mlp_layer_types`` marks dense have a plain gated MLP. Sparse
attention layers pick key blocks with a learned indexer, so patterns are not recomputed.
"""

from .spec import INPUT, Attn, Layout, Mlp, Moe, projections, sliding_window

_INDEXER = ("MiniMax-M3's sparse layers attend only to the key blocks its indexer selects per query (top-k blocks "
            "and local blocks), and its queries and keys pass per-head norms and a partial rotary embedding; the "
            "offline attention models none of that")

LAYOUTS = [
    Layout(
        name="minimax_m3_vl_text",
        model_types=("minimax_m3_vl_text",),
        embeds={"embed": "embed_tokens"},
        layers="layers",
        block=(Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"),
                    qk_norm=("self_attn.q_norm", "self_attn.k_norm"), window=sliding_window, no_patterns=_INDEXER),
               Moe("mlp", experts="mlp.experts", shared="mlp.shared_experts", routed_scale="routed_scaling_factor",
                   dense=Mlp("mlp", down="mlp.down_proj"))),
        resid_final=("norm", INPUT),
        final_norm="norm",
    ),
]
