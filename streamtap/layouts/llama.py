"""The Llama naming scheme: Llama, Mistral, Qwen2/3, StableLM, OLMo, Gemma.

They differ in norms (RMSNorm, LayerNorm, non-parametric LayerNorm, Gemma's 1 + w), biases,
q/k norms, grouped-query attention and Gemma's scaled embedding (the scaling happens inside the
embedding module, so its output is already the term); none of that changes where the terms
live. Parallel StableLM blocks only change what the MLP reads.
"""

from .spec import INPUT, Attn, Layout, Mlp, projections, sliding_window

LAYOUTS = [
    Layout(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "stablelm", "olmo", "gemma"),
        embeds={"embed": "embed_tokens"},
        layers="layers",
        block=(Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"),
                    qk_norm=(("self_attn.q_norm", "self_attn.q_layernorm"), ("self_attn.k_norm", "self_attn.k_layernorm")),
                    notes=(("clip_qkv", "queries, keys and values are clipped to [-{0}, {0}] after the projection"),),
                    window=sliding_window, clip="clip_qkv"),
               Mlp("mlp", down="mlp.down_proj", up="mlp.up_proj", gate="mlp.gate_proj", norm=("post_attention_layernorm", "input_layernorm"),
                   parallel="use_parallel_residual", act="hidden_act")),
        resid_final=("norm", INPUT),
        final_norm="norm",
    ),
]
