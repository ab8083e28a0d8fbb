"""Hybrid models: attention at some depths, a state-space, convolution or linear-attention mixer at
the others (LFM2, Bamba, Qwen3-Next, Jamba).

A mixer layer writes one term (``Mixer``): its recurrence has no heads whose outputs add up to it
the way attention heads' do, so the store keeps its output whole (``mixer_out``) and a
decomposition names it ``L{layer}_mixer``. Attention layers keep their per-head terms. Which kind a
layer is comes from the module tree: a block with ``self_attn`` is an attention block.
"""

from .spec import INPUT, Attn, Layout, Mixer, Mlp, Moe, Reciprocal, projections

ATTN = Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"))


def _attention_or_mixer(config, layer, block) -> str:
    """A block with a ``self_attn`` module (not None: Granite-4 sets it so) is an attention block; any other, a mixer block. Read off the
    module tree because that is what the model built (config spellings differ by version: Bamba's
    ``layers_block_type`` said ``"attention"``, now ``"full_attention"``)."""
    return "attn" if getattr(block, "self_attn", None) is not None else "mixer"


def _hybrid(name, model_type, *, attn: Attn, mixer: Mixer, ffn, final: str) -> Layout:
    return Layout(
        name=name,
        model_types=(model_type,),
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
    _hybrid("qwen3_next", "qwen3_next",
            attn=Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"),
                      qk_norm=("self_attn.q_norm", "self_attn.k_norm")),
            mixer=Mixer("linear_attn", norm="input_layernorm"),
            ffn=Moe("mlp", experts="mlp.experts", shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate"),
            final="norm"),
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
# Granite-4 hybrids without experts (num_local_experts 0): Mamba-2 or attention, then the shared MLP,
# with Granite's multipliers. With experts, the routed experts (not transformers' fused (x, index,
# weight) experts) and the shared MLP are sibling modules summed in the block, which no Moe step reads.
LAYOUTS.append(Layout(
    **{**_hybrid("granitemoehybrid", "granitemoehybrid", attn=ATTN, mixer=Mixer("mamba", norm="input_layernorm"),
                 ffn=Mlp("shared_mlp", down="shared_mlp.output_linear"), final="norm").__dict__,
       "when": lambda config: not getattr(config, "num_local_experts", 0),
       "embed_scale": "embedding_multiplier", "residual_scale": "residual_multiplier",
       "logit_scale": Reciprocal("logits_scaling")}))

_ZAMBA = ("its shared attention block (reused at several depths) reads the residual stream concatenated with the "
          "token embeddings, 2 x d_model wide, and its output, through a linear map, is added to the input of the "
          "next Mamba mixer, never to the residual stream itself: no attention head writes a term of the stream, so "
          "its heads cannot be decomposed per head")

REFUSED = {"zamba": _ZAMBA, "zamba2": _ZAMBA}
"""Model types refused up front, with the structure that rules out an exact per-head decomposition."""
