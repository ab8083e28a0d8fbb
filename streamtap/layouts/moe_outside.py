"""Mixtures of experts that act on the experts' output outside the fused experts module.

MiniMax-M3's text stack: Llama-named blocks whose mixture multiplies the routed experts' sum by
``routed_scaling_factor`` outside its fused experts, then adds an always-on shared expert
(``Moe(routed_scale=...)``); layers ``mlp_layer_types`` marks dense have a plain gated MLP. Sparse
attention layers pick key blocks with a learned indexer, so patterns are not recomputed.

AX-K1 (``axk1``): DeepSeek-V3 with an RMSNorm on the mixture's output after the routed and shared experts
are summed (``Moe(through="mlp.post_mlp_layernorm")``); its dense layers have no such norm.
"""

from .moe import MLA
from .spec import INPUT, Attn, InputOf, Layout, Mlp, Moe, projections, sliding_window

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

# AX-K1 is DeepSeek-V3 (latent attention, dense first layers, routed + shared experts) with one more RMSNorm on
# the mixture's output (mlp.post_mlp_layernorm), after the experts and the shared expert are summed: with its
# per-token scale frozen it is linear, so each expert's share passes through it as a post-sublayer norm
LAYOUTS.append(Layout(
    name="axk1",
    model_types=("axk1",),
    embeds={"embed": "embed_tokens"},
    layers="layers",
    block=(Attn("self_attn.o_proj", norm="input_layernorm", d_head="v_head_dim", no_patterns=MLA),
           Moe(InputOf("mlp.post_mlp_layernorm"), experts="mlp.experts", shared="mlp.shared_experts",
               through="mlp.post_mlp_layernorm",
               dense=Mlp("mlp", down="mlp.down_proj"))),
    resid_final=("norm", INPUT),
    final_norm="norm",
))
