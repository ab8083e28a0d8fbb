"""Hybrid models: attention at some depths, a state-space, convolution or linear-attention mixer at
the others (LFM2, Bamba, Qwen3-Next, Jamba).

A mixer layer writes one term (``Mixer``): its recurrence has no heads whose outputs add up to it
the way attention heads' do, so the store keeps its output whole (``mixer_out``) and a
decomposition names it ``L{layer}_mixer``. Attention layers keep their per-head terms. Which kind a
layer is comes from the module tree: a block with ``self_attn`` is an attention block.
"""

import dataclasses

from .moe import MLA, SHARED
from .spec import INPUT, Attn, Layout, Mixer, Mlp, Moe, Norm, Reciprocal, projections

ATTN = Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"))
_QWEN_NEXT_ATTN = Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"),
                       qk_norm=("self_attn.q_norm", "self_attn.k_norm"))


def _attention_or_mixer(config, layer, block) -> str:
    """A block with a ``self_attn`` module (not None: Granite-4 sets it so) is an attention block; any other, a mixer block. Read off the
    module tree because that is what the model built (config spellings differ by version: Bamba's
    ``layers_block_type`` said ``"attention"``, now ``"full_attention"``)."""
    return "attn" if getattr(block, "self_attn", None) is not None else "mixer"


def _hybrid(name, model_type, *, attn: Attn, mixer: Mixer, ffn, final: str) -> Layout:
    return Layout(
        name=name,
        model_types=(model_type,) if isinstance(model_type, str) else model_type,
        embeds={"embed": "embed_tokens"},
        layers="layers",
        block=(attn, ffn),
        blocks={"attn": (attn, ffn), "mixer": (mixer, ffn)},
        block_kind=_attention_or_mixer,
        resid_final=(final, INPUT),
        final_norm=final,
    )


LAYOUTS = [
    # LFM2: short gated convolutions; the norm after the last block is called embedding_norm
    _hybrid("lfm2", "lfm2",
            attn=Attn("self_attn.out_proj", norm="operator_norm", **projections("self_attn"),
                      qk_norm=("self_attn.q_layernorm", "self_attn.k_layernorm")),
            mixer=Mixer("conv", norm="operator_norm"),
            ffn=Mlp("feed_forward", down="feed_forward.w2"),
            final="embedding_norm"),
    # Bamba: Mamba-2 mixers
    _hybrid("bamba", "bamba",
            attn=ATTN, mixer=Mixer("mamba", norm="input_layernorm"),
            ffn=Mlp("feed_forward", down="feed_forward.down_proj"),
            final="final_layernorm"),
    # Jamba: Mamba mixers; a mixture of experts every expert_layer_period layers, a dense MLP between
    _hybrid("jamba", "jamba",
            attn=ATTN, mixer=Mixer("mamba", norm="input_layernorm"),
            ffn=Moe("feed_forward", experts="feed_forward.experts",
                    dense=Mlp("feed_forward", down="feed_forward.down_proj")),
            final="final_layernorm"),
    # Qwen3-Next: gated DeltaNet linear attention; gated full attention (the gate acts before o_proj,
    # so z is the gated mixture); a mixture of experts with a gated shared expert in every layer
    _hybrid("qwen3_next", ("qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text"), attn=_QWEN_NEXT_ATTN,
            mixer=Mixer("linear_attn", norm="input_layernorm"),
            ffn=Moe("mlp", experts="mlp.experts", shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate"),
            final="norm"),
    # Qwen3.5 (dense): Qwen3-Next's mixers and gated attention with a dense MLP
    _hybrid("qwen3_5", ("qwen3_5", "qwen3_5_text"), attn=_QWEN_NEXT_ATTN,
            mixer=Mixer("linear_attn", norm="input_layernorm"), ffn=Mlp("mlp", down="mlp.down_proj"), final="norm"),
]

# LFM2-MoE: LFM2 with a mixture of experts after its first num_dense_layers dense MLPs
LAYOUTS.append(_hybrid("lfm2_moe", "lfm2_moe", attn=LAYOUTS[0].blocks["attn"][0], mixer=Mixer("conv", norm="operator_norm"),
                       ffn=Moe("feed_forward", experts="feed_forward.experts",
                               dense=Mlp("feed_forward", down="feed_forward.w2")),
                       final="embedding_norm"))


def _temporal_kind(config, layer, block) -> str:
    """RecurrentGemma's temporal block is an attention where it has an output projection (o_proj),
    else a recurrent (RG-LRU) block."""
    return "attn" if hasattr(block.temporal_block, "o_proj") else "mixer"


def _gemma_normalizer(config) -> float:
    """sqrt(d_model) as RecurrentGemma keeps it, a bfloat16 buffer, by which it multiplies the embeddings."""
    import torch

    return float(torch.tensor(config.hidden_size ** 0.5, dtype=torch.bfloat16))


_RG_MLP = Mlp("mlp_block", down="mlp_block.down_proj")
_RG_ATTN = Attn("temporal_block.o_proj", norm="temporal_pre_norm", **projections("temporal_block"))
# RecurrentGemma (Griffin): RG-LRU recurrent blocks and local attention in a fixed pattern
LAYOUTS.append(Layout(
    name="recurrent_gemma", model_types=("recurrent_gemma",), embeds={"embed": "embed_tokens"}, layers="layers",
    block=(_RG_ATTN, _RG_MLP),
    blocks={"attn": (_RG_ATTN, _RG_MLP), "mixer": (Mixer("temporal_block", norm="temporal_pre_norm"), _RG_MLP)},
    block_kind=_temporal_kind, resid_final=("final_norm", INPUT), final_norm="final_norm",
    embed_scale=_gemma_normalizer, final_softcap="logits_soft_cap"))
# Granite-4 hybrids: Mamba-2 or attention, then the shared MLP, with Granite's multipliers; with experts
# (num_local_experts > 0) the routed experts write beside the shared MLP, a sibling module of the block
# that the mixture's write includes (as Granite-MoE-Shared's)
for _experts, _ffn in ((False, Mlp("shared_mlp", down="shared_mlp.output_linear")),
                       (True, Moe("block_sparse_moe", experts="block_sparse_moe.experts", shared="shared_mlp"))):
    LAYOUTS.append(Layout(
        **{**_hybrid("granitemoehybrid", "granitemoehybrid", attn=ATTN, mixer=Mixer("mamba", norm="input_layernorm"),
                     ffn=_ffn, final="norm").__dict__,
           "when": lambda config, _experts=_experts: bool(getattr(config, "num_local_experts", 0)) == _experts,
           "embed_scale": "embedding_multiplier", "residual_scale": "residual_multiplier",
           "logit_scale": Reciprocal("logits_scaling")}))

# OLMo-Hybrid: gated DeltaNet layers read the stream through a pre-norm; its attention layers are OLMo-2's
# (norms on each sublayer's output, q/k norms over the whole width)
_OLMO_MLP = Mlp("mlp", down="mlp.down_proj")
_OLMO_ATTN = Attn("self_attn.o_proj", through="post_attention_layernorm", **projections("self_attn"),
                  qk_norm=("self_attn.q_norm", "self_attn.k_norm"))
LAYOUTS.append(Layout(
    name="olmo_hybrid", model_types=("olmo_hybrid",), embeds={"embed": "embed_tokens"}, layers="layers",
    block=(_OLMO_ATTN, dataclasses.replace(_OLMO_MLP, through="post_feedforward_layernorm")),
    blocks={"attn": (_OLMO_ATTN, dataclasses.replace(_OLMO_MLP, through="post_feedforward_layernorm")),
            "mixer": (Mixer("linear_attn", norm="input_layernorm"), _OLMO_MLP)},
    block_kind=_attention_or_mixer, resid_final=("norm", INPUT), final_norm="norm"))


def _delta_or_latent(config, layer, block) -> str:
    """Kimi-Linear's and Bailing-Hybrid's ``self_attn`` is a delta-rule linear attention (a short
    convolution over q, k, v: a mixer) or multi-head latent attention (per-head terms)."""
    return "mixer" if hasattr(block.self_attn, "conv1d") else "attn"


# Kimi-Linear (KDA) and Bailing-Hybrid: delta-rule linear attention at most depths, DeepSeek's latent attention
# (Bailing's with a gate per head on z) at the others, DeepSeek's shared experts after first dense MLPs
_LATENT = Attn("self_attn.o_proj", norm="input_layernorm", d_head="v_head_dim", no_patterns=MLA)
for _name, _positions in (("kimi_linear", "none"), ("bailing_hybrid", "rotary")):
    LAYOUTS.append(Layout(
        name=_name, model_types=(_name,), embeds={"embed": "embed_tokens"}, layers="layers",
        block=(_LATENT, SHARED), blocks={"attn": (_LATENT, SHARED), "mixer": (Mixer("self_attn", norm="input_layernorm"),
                                                                         SHARED)},
        block_kind=_delta_or_latent, resid_final=("norm", INPUT), final_norm="norm", positions=_positions))


def _lightning_or_softmax(config, layer, block) -> str:
    """MiniMax's ``self_attn`` is lightning (linear) attention where it has a fused ``qkv_proj``, else softmax attention."""
    return "mixer" if hasattr(block.self_attn, "qkv_proj") else "attn"


def _unit_mlp_beta(config) -> bool:
    """MiniMax's factor on the mixture's write (mlp_beta_factor), which no Moe step carries: covered where it is 1."""
    return float(getattr(config, "mlp_beta_factor", 1)) == 1.0


# MiniMax: the residual is taken after each sublayer's norm (the whole stream passes through it, times that
# sublayer's alpha factor), each write times its beta factor; lightning attention at most depths, softmax
# attention at the others, a mixture of experts in every layer
_MM_MOE = (Norm("post_attention_layernorm", scale="mlp_alpha_factor"), Moe("mlp", experts="mlp.experts"))
_MM_ATTN = Attn("self_attn.o_proj", **projections("self_attn"), out_scale="full_attn_beta_factor")
LAYOUTS.append(Layout(
    name="minimax", model_types=("minimax",), embeds={"embed": "embed_tokens"}, layers="layers",
    block=(Norm("input_layernorm", scale="full_attn_alpha_factor"), _MM_ATTN, *_MM_MOE),
    blocks={"attn": (Norm("input_layernorm", scale="full_attn_alpha_factor"), _MM_ATTN, *_MM_MOE),
            "mixer": (Norm("input_layernorm", scale="linear_attn_alpha_factor"),
                      Mixer("self_attn", out_scale="linear_attn_beta_factor"), *_MM_MOE)},
    block_kind=_lightning_or_softmax, resid_final=("norm", INPUT), final_norm="norm", when=_unit_mlp_beta))

_ZAMBA = ("its shared attention block (reused at several depths) reads the residual stream concatenated with the "
          "token embeddings, 2 x d_model wide, and its output, through a linear map, is added to the input of the "
          "next Mamba mixer, never to the residual stream itself: no attention head writes a term of the stream, so "
          "its heads cannot be decomposed per head")

REFUSED = {"zamba": _ZAMBA, "zamba2": _ZAMBA}
"""Model types refused up front, with the structure that rules out an exact per-head decomposition."""
