"""Models whose forward runs one module more than once.

NanoChat applies its final ``norm`` (a parameter-free RMSNorm) to the embeddings too, before the first
block: the stream starts at that norm's output, so the embeddings pass through it as a stream norm whose
input is read as ``embed_tokens``'s output (the norm's own input holds two values per forward), and the
final residual is the last block's output. Its blocks are Llama's with parameter-free norms and a
plain MLP (``fc1``, activation, ``fc2``); queries and keys are normalised after the rotary embedding,
and the logits are soft-capped.

Dory runs its recurrent section's layers ``n_recurrent_loops`` times: one module at several depths.
"""

from .spec import OUTPUT, Attn, Layout, Mlp, Norm, projections

_NORM_AFTER_ROPE = ("its queries and keys are normalised after the rotary embedding (q_norm, k_norm), which the "
                    "offline attention does not model")

LAYOUTS = [
    Layout(
        name="nanochat",
        model_types=("nanochat",),
        embeds={"embed": "embed_tokens"},
        after_embeds=(Norm("norm", input_from="embed_tokens"),),
        layers="layers",
        block=(Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"),
                    notes=("queries and keys pass through parameter-free RMSNorms after the rotary embedding",),
                    no_patterns=_NORM_AFTER_ROPE),
               Mlp("mlp", down="mlp.fc2", up="mlp.fc1", norm="post_attention_layernorm", act="hidden_act")),
        resid_final=("layers.{last}", OUTPUT),
        final_norm="norm",
        final_softcap="final_logit_softcapping",
    ),
]

REFUSED = {
    "dory": ("its recurrent section runs the same decoder layers n_recurrent_loops times (2 by default), each loop "
             "restarting from the normalised stream plus the section's normalised input, and every sublayer "
             "interpolates the stream (hidden + rate * (output - hidden)) after a norm of the whole stream; a "
             "layout binds one module per depth and reads it once per forward, so the loops' terms cannot be "
             "told apart"),
}
