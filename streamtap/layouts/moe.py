"""Mixtures of experts: Mixtral, PhiMoE, Qwen2/3-MoE, OLMoE, FlexOlmo, GPT-OSS, DeepSeek-V2/V3 (and the
latent-attention Sarvam-MLA, GLM-4-MoE-Lite, DeepSeek-V3.2, GLM-MoE-DSA), Ernie-4.5-MoE, GLM-4-MoE (Param-2-MoE,
Sarvam-MoE, HY-V3), dots1, HunYuan-MoE-V1, EXAONE-MoE, Aria, MiMo-V2-Flash, MiniCPM-5-MoE, AFMoE, Laguna, Llama-4.

The MLP term of a layer splits into one term per expert actually routed to, weighted by its
router weight (and the shared expert's term, gated or not), so a researcher can ask which expert
wrote what. Layers without experts (DeepSeek's first dense layers, Qwen3-MoE's ``mlp_only_layers``)
write one dense MLP term. GPT-OSS adds learned attention sinks to the softmax; DeepSeek's
multi-head latent attention keeps per-head z and W_O, but its queries and keys pass through
low-rank projections with a norm between them, so its patterns are not recomputed. HunYuan normalises queries and keys after rotating them, which
the offline recomputation (norm, then rotation) does not reproduce: its patterns are refused too.
Gated attentions (a gate on z before the output projection) keep exact per-head terms but store no
W_Q/W_K/W_V and refuse patterns. Llama-4's experts run on router-weighted input (``Moe.router``).
"""

import dataclasses

from .spec import INPUT, Attn, Layout, Mlp, Moe, projections, sliding_window

ATTN = Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"), window=sliding_window)
QK_NORM_ATTN = Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"), window=sliding_window,
                    qk_norm=("self_attn.q_norm", "self_attn.k_norm"), clip="clip_qkv",
                    notes=(("clip_qkv", "queries, keys and values are clipped to [-{0}, {0}] after the projection"),))
DENSE = Mlp("mlp", down="mlp.down_proj")
SHARED = Moe("mlp", experts="mlp.experts", shared="mlp.shared_experts", dense=DENSE)
QK_AFTER_ROPE = ("its query and key norms act after the rotary rotation, and a norm's per-dimension weights do not "
                 "commute with the rotation, so the offline order (norm, then rotation) is not the model's")
GATED = ("its attention output is multiplied by a sigmoid gate read from the layer's input before the output "
         "projection, so z is the gated mixture of values, not the pattern-weighted values a recomputed pattern gives")
MLA = ("multi-head latent attention: queries and keys come through low-rank projections with a norm between "
       "them and a rotary part shared by the heads, which no per-head W_Q/W_K reproduces")


def _rotates_sliding(config, attention) -> bool:
    """EXAONE's rule: with a sliding window configured, only sliding layers rotate (global ones use no positions)."""
    return attention.sliding_window is None or bool(getattr(attention, "is_sliding", True))


def _mup_embedding(config) -> float:
    """AFMoE's muP input scaling: the embeddings times sqrt(hidden_size) where ``mup_enabled``."""
    return config.hidden_size ** 0.5 if getattr(config, "mup_enabled", False) else 1.0


def _uniform_heads(config) -> bool:
    """Laguna's per-layer head counts are one count (a store keeps the same heads at every layer)."""
    return len(set(getattr(config, "num_attention_heads_per_layer", None) or [config.num_attention_heads])) == 1


def _layer_heads(config) -> int:
    return (getattr(config, "num_attention_heads_per_layer", None) or [config.num_attention_heads])[0]


def _layout(name: str, model_types: tuple[str, ...], attn: Attn, moe: Moe) -> Layout:
    return Layout(name=name, model_types=model_types, embeds={"embed": "embed_tokens"}, layers="layers",
                  block=(attn, moe), resid_final=("norm", INPUT), final_norm="norm")


LAYOUTS = [
    _layout("mixtral", ("mixtral", "phimoe"), ATTN, Moe("mlp", experts="mlp.experts")),
    _layout("qwen2_moe", ("qwen2_moe",), ATTN, Moe("mlp", experts="mlp.experts", shared="mlp.shared_expert",
                                                    shared_gate="mlp.shared_expert_gate", dense=DENSE)),
    _layout("qwen3_moe", ("qwen3_moe", "olmoe"), QK_NORM_ATTN, Moe("mlp", experts="mlp.experts", dense=DENSE)),
    _layout("gpt_oss", ("gpt_oss",),
            Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"), window=sliding_window,
                 sinks="sinks", rotary="halves"),
            Moe("mlp", experts="mlp.experts")),
    # DeepSeek-V3's classes also build Sarvam-MLA; GLM-4-MoE-Lite, DeepSeek-V3.2 and GLM-MoE-DSA (whose
    # indexer picks the keys each query attends to; z is still per head) write the same way
    _layout("deepseek", ("deepseek_v2", "deepseek_v3", "sarvam_mla", "glm4_moe_lite", "deepseek_v32", "glm_moe_dsa"),
            Attn("self_attn.o_proj", norm="input_layernorm", d_head="v_head_dim", no_patterns=MLA), SHARED),
    # GLM-4-MoE's classes also build Param-2-MoE and Sarvam-MoE; HY-V3 is the same block under its own names
    _layout("shared_experts", ("glm4_moe", "dots1", "param2moe", "sarvam_moe", "hy_v3"), QK_NORM_ATTN, SHARED),
    _layout("aria_text", ("aria_text",), ATTN, Moe("mlp", experts="mlp.experts", shared="mlp.shared_experts")),
    _layout("exaone_moe", ("exaone_moe",),
            dataclasses.replace(QK_NORM_ATTN, rotates=_rotates_sliding), SHARED),
    # MiMo-V2-Flash: sinks on its sliding layers, a partial rotation and values scaled inside the attention;
    # MiniCPM-5-MoE: a sigmoid gate fused with the queries (q_gate_proj) scales z. Terms per head, no W_Q/W_K/W_V.
    _layout("mimo_v2_flash", ("mimo_v2_flash",),
            Attn("self_attn.o_proj", norm="input_layernorm", d_head="v_head_dim", no_patterns=(
                "its values are scaled inside the attention (attention_value_scale) and its sliding layers add "
                "learned sinks under a partial rotation, which the stored weights do not describe")),
            Moe("mlp", experts="mlp.experts", dense=DENSE)),
    _layout("minicpm5_moe", ("minicpm5_moe",), Attn("self_attn.o_proj", norm="input_layernorm", no_patterns=GATED),
            SHARED),
    _layout("ernie4_5_moe", ("ernie4_5_moe",),
            Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"), window=sliding_window,
                 rotary="interleaved_from_half"), SHARED),
    _layout("hunyuan_v1_moe", ("hunyuan_v1_moe",),
            Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"), no_patterns=QK_AFTER_ROPE),
            Moe("mlp", experts="mlp.experts", shared="mlp.shared_mlp", dense=DENSE)),
    _layout("flex_olmo", ("flex_olmo",),   # OLMo-2's norms on each sublayer's output, experts in the MLP
            Attn("self_attn.o_proj", through="post_attention_layernorm", **projections("self_attn"),
                 qk_norm=("self_attn.q_norm", "self_attn.k_norm"), window=sliding_window),
            Moe("mlp", experts="mlp.experts", through="post_feedforward_layernorm")),
    # AFMoE: norms before and after each sublayer, a sigmoid gate on z, muP-scaled embeddings
    dataclasses.replace(
        _layout("afmoe", ("afmoe",),
                Attn("self_attn.o_proj", norm="input_layernorm", through="post_attention_layernorm", no_patterns=GATED),
                dataclasses.replace(SHARED, through="post_mlp_layernorm")),
        embed_scale=_mup_embedding),
    # Laguna: AFMoE's gated attention (a softplus gate per head or per dimension) with per-layer head counts,
    # pre-norm blocks, and a factor on the routed experts' sum outside the experts
    dataclasses.replace(
        _layout("laguna", ("laguna",),
                Attn("self_attn.o_proj", norm="input_layernorm", heads=_layer_heads,
                     no_patterns=GATED.replace("sigmoid", "softplus")),
                dataclasses.replace(SHARED, routed_scale="moe_routed_scaling_factor")),
        when=_uniform_heads),
    # Llama-4: experts on router-weighted input (Moe.router), a shared expert, dense MLPs between MoE layers
    Layout(name="llama4", model_types=("llama4", "llama4_text"), embeds={"embed": "model.embed_tokens"},
           layers="model.layers",
           block=(Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"), no_patterns=(
                      "its rotary layers attend within fixed chunks (attention_chunk_size) and L2-normalise queries "
                      "and keys, and its no-rope layers scale queries by a position-dependent temperature, which the "
                      "offline attention does not model"), notes=(
                      "rotary layers: queries and keys pass through a weightless L2 norm after the rotation",)),
                  Moe("feed_forward", experts="feed_forward.experts", shared="feed_forward.shared_expert",
                      router="feed_forward.router", flat=True, dense=Mlp("feed_forward", down="feed_forward.down_proj"))),
           resid_final=("model.norm", INPUT), final_norm="model.norm"),
]

REFUSED = {
    "hy_v4": ("its hyper-connections keep hc_mult residual streams: each sublayer reads a mix of them weighted per "
              "token, and writes its output into every stream with another per-token weight, so no single residual "
              "stream adds up to what each block reads"),
}
"""Model types refused up front, with the structure that rules out an exact decomposition of one stream."""
