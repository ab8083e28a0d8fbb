"""Norms on each sublayer's output before it joins the stream: Gemma-2, Gemma-3, OLMo-2.

Each attention and MLP term passes through its own RMSNorm (frozen per token), so a head's
message in the stream is post_norm(message) and not the raw message.
"""

from .spec import INPUT, Attn, Layout, Mlp, projections, sliding_window

_QK_NORM = ("self_attn.q_norm", "self_attn.k_norm")

LAYOUTS = [
    Layout(
        name="gemma2",
        model_types=("gemma2", "gemma3_text", "gemma3"),
        embeds={"embed": "embed_tokens"},
        layers="layers",
        block=(Attn("self_attn.o_proj", through="post_attention_layernorm", norm="input_layernorm",
                    **projections("self_attn"), qk_norm=_QK_NORM,
                    notes=(("attn_logit_softcapping", "attention scores are soft-capped: cap * tanh(score / cap), cap = {}"),),
                    window=sliding_window, softcap="attn_logit_softcapping"),
               Mlp("mlp", down="mlp.down_proj", through="post_feedforward_layernorm", up="mlp.up_proj",
                   gate="mlp.gate_proj", norm="pre_feedforward_layernorm", act="hidden_activation")),
        resid_final=("norm", INPUT),
        final_norm="norm",
        notes="logit soft-capping acts after the unembedding and does not touch the residual",
        final_softcap="final_logit_softcapping",
    ),
    Layout(
        name="olmo2",
        model_types=("olmo2",),
        embeds={"embed": "embed_tokens"},
        layers="layers",
        block=(Attn("self_attn.o_proj", through="post_attention_layernorm", **projections("self_attn"),
                    qk_norm=_QK_NORM, window=sliding_window),  # no input norm: OLMo-2's attention reads the stream itself
               # no input norm either: its MLP reads the stream itself
               Mlp("mlp", down="mlp.down_proj", through="post_feedforward_layernorm", up="mlp.up_proj",
                   gate="mlp.gate_proj", act="hidden_act")),
        resid_final=("norm", INPUT),
        final_norm="norm",
    ),
]
