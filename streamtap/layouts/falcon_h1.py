"""Falcon-H1: a Mamba-2 mixer and an attention side by side in every block, both reading
``input_layernorm``, then an MLP; muP multipliers everywhere.

The mixer writes one term per layer (times ``ssm_out_multiplier``), the attention keeps its heads
(W_O and b_O times ``attention_out_multiplier``), the token embedding enters times
``embedding_multiplier`` and the logits leave times ``lm_head_multiplier``: each stored term is what
the model adds to the stream. The MLP's own multipliers act inside its module (only W_out carries
its down multiplier); ``attention_in_multiplier``, ``key_multiplier`` and the mixer's ``mup_vector``
act on what the sublayers read, not on what they write, so the terms need nothing for them.
"""

from .spec import INPUT, Attn, Layout, Mixer, Mlp, projections


def _down_multiplier(config) -> float:
    return config.mlp_multipliers[1]


LAYOUTS = [
    Layout(
        name="falcon_h1",
        model_types=("falcon_h1",),
        embeds={"embed": "embed_tokens"},
        layers="layers",
        block=(Mixer("mamba", norm="input_layernorm", out_scale="ssm_out_multiplier"),
               Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"),
                    out_scale="attention_out_multiplier",
                    no_patterns=("its queries and keys are read times attention_in_multiplier and key_multiplier, "
                                 "which the offline attention does not apply")),
               Mlp("feed_forward", down="feed_forward.down_proj", down_scale=_down_multiplier)),
        resid_final=("final_layernorm", INPUT),
        final_norm="final_layernorm",
        embed_scale="embedding_multiplier",
        logit_scale="lm_head_multiplier",
    ),
]
