"""OPT, pre-LN (125m and most sizes) and post-LN (350m: ``do_layer_norm_before=False``).

``project_in`` (present when ``word_embed_proj_dim != hidden_size``) maps the embeddings into the
stream, so its output is the embedding term; ``project_out`` maps the final residual back before
the unembedding and is folded into the stored unembedding. Post-LN blocks normalise the whole
stream after each sublayer; the frozen scales keep every earlier term exact through them.
OPT multiplies the query by the score scale right after ``q_proj``; the stored W_Q is ``q_proj``'s
own weight, and ``attn_scale`` holds that factor as it does for every model.
"""

from .spec import INPUT, OUTPUT, Attn, Layout, Mlp, Norm, projections

_QKV = projections("self_attn")
_ACT = "activation_function"

_COMMON = dict(
    model_types=("opt",),
    embeds={"embed": ("decoder.project_in", "decoder.embed_tokens"), "pos_embed": "decoder.embed_positions"},
    layers="decoder.layers",
    unembed_through="decoder.project_out",
    positions="learned",
)

LAYOUTS = [
    Layout(
        name="opt-post-ln",
        when=lambda config: not config.do_layer_norm_before,
        block=(Attn("self_attn.out_proj", **_QKV), Norm("self_attn_layer_norm"), Mlp("fc2", flat=True, up="fc1", act=_ACT),
               Norm("final_layer_norm")),   # the MLP reads the stream itself, normalised by self_attn_layer_norm
        resid_final=("decoder.layers.{last}", OUTPUT),
        **_COMMON,
    ),
    Layout(
        name="opt",
        block=(Attn("self_attn.out_proj", norm="self_attn_layer_norm", **_QKV),
               Mlp("fc2", flat=True, up="fc1", norm="final_layer_norm", act=_ACT)),
        resid_final=("decoder.final_layer_norm", INPUT),
        final_norm="decoder.final_layer_norm",
        **_COMMON,
    ),
]
