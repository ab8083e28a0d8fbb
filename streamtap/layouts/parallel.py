"""Parallel blocks (attention and MLP read the same input): GPT-J, GPT-NeoX/Pythia, Phi, Falcon.

Parallelism changes what each sublayer reads, never the sum. Falcon adds the attention output
into the MLP output in place (``mlp_output += attention_output``), so its MLP term is copied the
moment it is produced.
"""

from .spec import INPUT, Attn, Layout, Mlp, projections


def _gptj_scale(attn) -> float:
    # newer transformers releases keep the factor as ``scaling``; older ones divided by ``scale_attn``
    if hasattr(attn, "scaling"):
        return float(attn.scaling)
    return 1.0 / float(attn.scale_attn)


LAYOUTS = [
    Layout(
        name="gptj",
        model_types=("gptj",),
        embeds={"embed": "wte"},
        layers="h",
        block=(Attn("attn.out_proj", norm="ln_1", scale=_gptj_scale, **projections("attn"), rotary="interleaved",
                    rotary_order="sin_cos"),
               Mlp("mlp", down="mlp.fc_out", up="mlp.fc_in", norm="ln_1", parallel=True, act="activation_function")),
        resid_final=("ln_f", INPUT),
        final_norm="ln_f",
    ),
    Layout(
        name="gpt_neox",
        model_types=("gpt_neox",),
        embeds={"embed": "embed_in"},
        layers="layers",
        block=(Attn("attention.dense", qkv="attention.query_key_value", split="per_group", norm="input_layernorm"),
               Mlp("mlp", down="mlp.dense_4h_to_h", up="mlp.dense_h_to_4h", norm="post_attention_layernorm",
                   parallel="use_parallel_residual", act="hidden_act")),
        resid_final=("final_layer_norm", INPUT),
        final_norm="final_layer_norm",
    ),
    Layout(
        name="phi",
        model_types=("phi",),
        embeds={"embed": "embed_tokens"},
        layers="layers",
        block=(Attn("self_attn.dense", norm="input_layernorm", **projections("self_attn"),
                    qk_norm=("self_attn.q_layernorm", "self_attn.k_layernorm")),
               Mlp("mlp", down="mlp.fc2", up="mlp.fc1", norm="input_layernorm", parallel=True, act="hidden_act")),
        resid_final=("final_layernorm", INPUT),
        final_norm="final_layernorm",
    ),
    Layout(
        name="falcon",
        model_types=("falcon",),
        embeds={"embed": "word_embeddings"},
        layers="h",
        block=(Attn("self_attention.dense", qkv="self_attention.query_key_value", split="per_group",
                    norm=("ln_attn", "input_layernorm"), scale="inv_norm_factor",
                    notes=(("alibi", "ALiBi biases are added to the scores by query-key distance"),)),
               # no alibi= input: FalconModel folds the biases (scaled by 1/sqrt(d_head)) into the attention
               # mask, and its blocks take none, so pattern_support refuses patterns=True with config.alibi
               Mlp("mlp", down="mlp.dense_4h_to_h", clone=True, up="mlp.dense_h_to_4h",
                   # its own norm (two-norm new decoder), the sequential one, else the attention's shared one
                   norm=("ln_mlp", "post_attention_layernorm", "input_layernorm"), parallel="parallel_attn",
                   act="activation")),
        resid_final=("ln_f", INPUT),
        final_norm="ln_f",
        positions=lambda config: "alibi" if getattr(config, "alibi", False) else "rotary",
    ),
]
