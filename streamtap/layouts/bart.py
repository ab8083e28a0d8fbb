"""BART-style decoders used as causal LMs (``XxxForCausalLM``: the decoder of an encoder-decoder alone).

BART, PLBART, MVP, Marian, TrOCR and BlenderBot-Small normalise the whole stream after each
sublayer (post-LN: the final residual is the last block's output); mBART, Pegasus, BlenderBot,
Whisper and BigBird-Pegasus read each sublayer through its own norm (pre-LN) and end with a final
norm (BigBird-Pegasus names it ``layernorm_embedding``). Each block also holds a cross-attention
(``encoder_attn`` and its norm), which the causal LM never runs: it is given no encoder states, so
the block's code skips it and nothing of it reaches the stream.

Embeddings: the token embedding and an additive position table (learned, with BART's offset of 2
inside the module, or sinusoidal: Marian, Pegasus, TrOCR's option) are two terms. The
``sqrt(d_model)`` embedding scale (``scale_embedding``) is inside the embedding module where it is
a ``ScaledWordEmbedding``; Marian, Pegasus and MVP multiply after a plain ``nn.Embedding``, so the
layout declares it. BART's ``layernorm_embedding`` normalises the sum of both; BlenderBot-Small's
normalises the token embedding alone before the positions are added, so its output is the one
token term.
"""

import math

from .spec import INPUT, OUTPUT, Attn, Layout, Mlp, Norm, projections


_SCALED_OUTSIDE = ("marian", "pegasus", "mvp")   # a plain nn.Embedding, multiplied in the decoder's forward


def _embed_scale(config) -> float:
    """The multiplier the decoder's code applies to a plain ``nn.Embedding``'s output (1 where the
    scale is inside a ``ScaledWordEmbedding``, whose output the tap reads already scaled)."""
    if config.model_type in _SCALED_OUTSIDE and config.scale_embedding:
        return math.sqrt(config.d_model)
    return 1.0


def _decoder_only(config) -> bool:
    """The causal LM (the decoder alone); the full encoder-decoder (``ForConditionalGeneration``) adds a
    cross-attention term to every block, which these layouts do not declare."""
    return not config.is_encoder_decoder


def _prompt(config) -> str | None:
    if getattr(config, "use_prompt", False):
        return ("MVP's lightweight prompts add keys and values to every attention that the store does not keep "
                "(use_prompt=True)")
    return None


_ATTN = dict(**projections("self_attn"), unsupported=_prompt)
_EMBEDS = {"embed": "decoder.embed_tokens", "pos_embed": "decoder.embed_positions"}
_POST_LN = dict(
    embed_scale=_embed_scale,
    layers="decoder.layers",
    block=(Attn("self_attn.out_proj", **_ATTN), Norm("self_attn_layer_norm"), Mlp("fc2"), Norm("final_layer_norm")),
    resid_final=("decoder.layers.{last}", OUTPUT),
    positions="learned",
)
_PRE_LN = dict(
    embed_scale=_embed_scale,
    layers="decoder.layers",
    block=(Attn("self_attn.out_proj", norm="self_attn_layer_norm", **_ATTN), Mlp("fc2")),
    positions="learned",
)
_NOTES = "the decoder alone: its cross-attention (encoder_attn) is skipped without encoder states"

LAYOUTS = [
    Layout(name="bart", model_types=("bart", "plbart", "mvp", "trocr"),
           when=lambda config: _decoder_only(config) and getattr(config, "layernorm_embedding", True) is not False,
           embeds=_EMBEDS, after_embeds=(Norm("decoder.layernorm_embedding"),),
           notes=_NOTES, **_POST_LN),
    Layout(name="bart-no-embedding-norm", model_types=("marian", "trocr"), embeds=_EMBEDS, when=_decoder_only,
           notes=_NOTES, **_POST_LN),
    Layout(name="blenderbot-small", model_types=("blenderbot-small",), when=_decoder_only,
           embeds={"embed": "decoder.layernorm_embedding", "pos_embed": "decoder.embed_positions"},
           notes=_NOTES + "; the token embedding is normalised alone before the positions are added, so "
                          "layernorm_embedding's output is the token term", **_POST_LN),
    Layout(name="mbart", when=_decoder_only, model_types=("mbart",), embeds=_EMBEDS, after_embeds=(Norm("decoder.layernorm_embedding"),),
           resid_final=("decoder.layer_norm", INPUT), final_norm="decoder.layer_norm", notes=_NOTES, **_PRE_LN),
    Layout(name="pegasus", when=_decoder_only, model_types=("pegasus", "blenderbot", "whisper"), embeds=_EMBEDS,
           resid_final=("decoder.layer_norm", INPUT), final_norm="decoder.layer_norm", notes=_NOTES, **_PRE_LN),
    Layout(name="bigbird_pegasus", when=_decoder_only, model_types=("bigbird_pegasus",), embeds=_EMBEDS,
           resid_final=("decoder.layernorm_embedding", INPUT), final_norm="decoder.layernorm_embedding",
           notes=_NOTES + "; its final norm is named layernorm_embedding", **_PRE_LN),
]

REFUSED = {
    # ProphetNetDecoder concatenates the main stream and config.ngram predicting streams along the sequence
    # axis (torch.cat([hidden_states] + ngram_hidden_states, 1)) and runs them through every layer together
    "prophetnet": ("its decoder runs the main stream and `ngram` predicting streams (one per future token it "
                   "predicts) concatenated along the sequence axis through every layer, and its n-gram "
                   "self-attention mixes them with relative-position buckets, so a layer's input is not one "
                   "residual stream per token of the batch that terms could be split from"),
}
