"""Early transformer LMs: GPT-1 and XLM (post-LN), CTRL (pre-LN).

GPT-1 (``openai-gpt``) is GPT-2's block with the norms after each sublayer, on the whole stream,
and no final norm: the final residual is the last block's output, read by the tied unembedding.
XLM (and FlauBERT, post-LN unless ``pre_norm``) is the same post-LN block kept in four parallel
module lists (``attentions``, ``layer_norm1``, ``ffns``, ``layer_norm2``), so its steps name
``{layer}`` from the base model; its embeddings (token, position) pass through
``layer_norm_emb``. XLM zeroes padded positions after every layer, which a real token's terms do
not see.

CTRL is pre-LN with a final norm. It multiplies its token embedding by sqrt(d_model) in place and
adds a sinusoidal table it indexes itself (``pos_encoding``, a buffer, no module), so its
embeddings enter as one term, read at the first block's input.
"""

import math

from .spec import INPUT, OUTPUT, Attn, InputOf, Layout, Mlp, Norm, projections


def _gpt1_scale(attn) -> float:
    """GPT-1 divides q.k by sqrt(d_head) where its attention is built with ``scale`` (every block)."""
    return 1 / math.sqrt(attn.split_size // attn.n_head) if attn.scale else 1.0


LAYOUTS = [
    Layout(
        name="openai-gpt",
        model_types=("openai-gpt",),
        embeds={"embed": "tokens_embed", "pos_embed": "positions_embed"},
        layers="h",
        block=(Attn("attn.c_proj", qkv="attn.c_attn", split="concat", scale=_gpt1_scale), Norm("ln_1"),
               Mlp("mlp", down="mlp.c_proj"), Norm("ln_2")),
        resid_final=("h.{last}.ln_2", OUTPUT),
        positions="learned",
    ),
    Layout(
        name="xlm",
        model_types=("xlm", "flaubert"),
        # language embeddings are added only where the config has several languages and a forward passes langs;
        # FlauBERT's pre_norm variant reads each sublayer through its norm and has no module the final residual leaves
        when=lambda config: not (config.use_lang_emb and config.n_langs > 1) and not getattr(config, "pre_norm", False),
        embeds={"embed": "embeddings", "pos_embed": "position_embeddings"},
        after_embeds=(Norm("layer_norm_emb"),),
        layers="attentions",
        block=(Attn("attentions.{layer}.out_lin", **projections("attentions.{layer}", "q_lin", "k_lin", "v_lin"),
                    scale=lambda attn: 1 / math.sqrt(attn.head_dim)),
               Norm("layer_norm1.{layer}"), Mlp("ffns.{layer}", down="ffns.{layer}.lin2"), Norm("layer_norm2.{layer}")),
        resid_final=("layer_norm2.{last}", OUTPUT),
        positions="learned",
        causal=lambda config: bool(config.causal),
    ),
]

LAYOUTS.append(Layout(
    name="ctrl",
    model_types=("ctrl",),
    embeds={"embed": InputOf("h.0")},
    notes=("the scaled token embedding and the sinusoidal positions (an indexed buffer) enter as one term, embed, "
           "read at the first block's input"),
    layers="h",
    block=(Attn("multi_head_attention.dense", **projections("multi_head_attention", "Wq", "Wk", "Wv"), norm="layernorm1"),
           Mlp("ffn", down="ffn.2")),
    resid_final=("layernorm", INPUT),
    final_norm="layernorm",
    positions="learned",
))
