"""Models whose blocks hold one sublayer each: pure state-space models (Mamba, Mamba-2, Falcon-Mamba),
where every layer is one mixer term, and Nemotron-H, whose layers are each a Mamba-2 mixer, an
attention, an MLP or a mixture of experts.

Every block reads the stream through its one norm (``norm``) and adds its ``mixer`` module's output.
A pure state-space store has no heads (z and W_O are empty) and no MLP terms (mlp_out is zeros);
Nemotron-H's store keeps heads at its attention layers and zeros wherever a layer's kind does not write.
"""

from .spec import INPUT, Attn, Layout, Mixer, Mlp, Moe, projections


def _ssm(name: str, model_types: tuple[str, ...]) -> Layout:
    return Layout(name=name, model_types=model_types, embeds={"embed": "embeddings"}, layers="layers",
                  block=(Mixer("mixer", norm="norm"),), resid_final=("norm_f", INPUT), final_norm="norm_f",
                  positions="none")


_NEMOTRON_KINDS = {"mamba": "mixer", "linear_attention": "mixer", "attention": "attn", "full_attention": "attn",
                   "mlp": "mlp", "moe": "moe"}


def _nemotron_kind(config, layer, block) -> str:
    """The kind the block built itself as (its ``block_type``: mamba/linear_attention, attention, mlp, moe)."""
    return _NEMOTRON_KINDS.get(block.block_type, block.block_type)


_NEMOTRON_ATTN = Attn("mixer.o_proj", norm="norm", **projections("mixer"))

LAYOUTS = [
    _ssm("mamba", ("mamba", "mamba2", "falcon_mamba")),
    Layout(name="nemotron_h", model_types=("nemotron_h",), embeds={"embed": "embeddings"}, layers="layers",
           block=(_NEMOTRON_ATTN,),
           blocks={"mixer": (Mixer("mixer", norm="norm"),), "attn": (_NEMOTRON_ATTN,),
                   "mlp": (Mlp("mixer", down="mixer.down_proj"),),
                   "moe": (Moe("mixer", experts="mixer.experts", shared="mixer.shared_experts"),)},
           block_kind=_nemotron_kind, resid_final=("norm_f", INPUT), final_norm="norm_f",
           # a latent projection around the experts (moe_latent_size) maps their sum after routing
           when=lambda config: getattr(config, "moe_latent_size", None) is None,
           positions="none"),
]
