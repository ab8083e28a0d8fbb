"""Post-LN encoders: BERT, RoBERTa (XLM-RoBERTa, CamemBERT, Data2Vec-text), ELECTRA and DistilBERT.

The embeddings (word, position, token type) pass through a LayerNorm, and each block normalises
the whole stream after attention and after the MLP. The final residual is the last block's
output; every earlier term is carried through each later norm with its frozen per-token scale,
and each norm's beta is a term of its own. The masked-LM head is not linear, so no unembedding
is stored. DistilBERT is the same block under other names, without token types. ELECTRA is BERT;
where its embedding width differs from the hidden size, ``embeddings_project`` maps the normalised
embeddings into the stream, and its output is then the one embedding term.

The same post-LN block under BERT's names: ERNIE (with its task-type embedding where
``use_task_id``), BigBird (whose attention is block-sparse only on sequences long enough; the
stream's terms are the same either way), BERT-Generation and GIT's text decoder (no token types),
RemBERT (``encoder.embedding_hidden_mapping_in`` maps the normalised embeddings into the stream: one
term), RoC-BERT (its word, glyph and pronunciation embeddings are concatenated, mapped and added in
place to the positions, so the embeddings module's output is the one term) and RoFormer (no position
table: queries and keys are rotated by a sinusoidal table the encoder hands every layer).

Pre-LN encoders (each sublayer reads the stream through its own norm, a final norm at the end):
Megatron-BERT, RoBERTa-PreLayerNorm (with BERT's embedding norm too) and XLM-RoBERTa-XL.
"""

from .spec import INPUT, OUTPUT, Attn, Layout, Mlp, Norm, projections


def _is_decoder(config) -> bool:
    """BERT-named models attend causally where the config sets ``is_decoder`` (a causal LM), else both ways."""
    return bool(getattr(config, "is_decoder", False))


def _block_sparse(config) -> str | None:
    if getattr(config, "attention_type", None) == "block_sparse":
        return ("BigBird's block-sparse attention (a sliding window, global and random key blocks, on sequences "
                "longer than its blocks cover) is not one softmax over the keys a pattern is recomputed from; "
                "attention_type='original_full' is")
    return None


_BERT_EMBEDS = {"embed": "embeddings.word_embeddings", "pos_embed": "embeddings.position_embeddings",
                "token_type_embed": "embeddings.token_type_embeddings"}
_QKV = projections("attention.self", "query", "key", "value")
_BERT = dict(  # what BERT-named encoders share: post-LN blocks under encoder.layer, no linear head
    layers="encoder.layer",
    block=(Attn("attention.output.dense", **_QKV),
           Norm("attention.output.LayerNorm"),
           Mlp("output.dense", up="intermediate.dense", act="hidden_act"), Norm("output.LayerNorm")),
    resid_final=("encoder.layer.{last}.output.LayerNorm", OUTPUT),
    unembed=False,
    positions="learned",
    causal=_is_decoder,
)

_EMBED_NORM = (Norm("embeddings.LayerNorm"),)
_NO_TOKEN_TYPES = {"embed": "embeddings.word_embeddings", "pos_embed": "embeddings.position_embeddings"}
_ONE_TERM = ("the embeddings (word, position, token type, normalised) are mapped into the stream by {}, so they "
             "enter as one term, embed")
_ROTARY = ("RoFormer rotates queries and keys by the sinusoidal table its encoder hands every layer "
           "(sinusoidal_pos), which a store does not keep")
_ROFORMER = {**_BERT, "positions": "rotary", "block": (
    Attn("attention.output.dense", **_QKV, no_patterns=_ROTARY),
    *_BERT["block"][1:])}
_PRE_LN = dict(unembed=False, positions="learned", causal=_is_decoder, layers="encoder.layer")

LAYOUTS = [
    Layout(name="bert", model_types=("bert", "roberta", "xlm-roberta", "camembert", "data2vec-text"),
           embeds=_BERT_EMBEDS, after_embeds=_EMBED_NORM, **_BERT),
    Layout(name="big_bird", model_types=("big_bird",), embeds=_BERT_EMBEDS, after_embeds=_EMBED_NORM,
           **{**_BERT, "block": (Attn("attention.output.dense", **_QKV, unsupported=_block_sparse), *_BERT["block"][1:])}),
    Layout(name="ernie", model_types=("ernie",), when=lambda config: not config.use_task_id,
           embeds=_BERT_EMBEDS, after_embeds=_EMBED_NORM, **_BERT),
    Layout(name="ernie-task-type", model_types=("ernie",),
           embeds={**_BERT_EMBEDS, "task_type_embed": "embeddings.task_type_embeddings"},
           after_embeds=_EMBED_NORM, **_BERT),
    Layout(name="bert-generation", model_types=("bert-generation",), embeds=_NO_TOKEN_TYPES,
           after_embeds=_EMBED_NORM, **_BERT),
    Layout(name="git", model_types=("git",), embeds=_NO_TOKEN_TYPES, after_embeds=_EMBED_NORM,
           notes="GIT's text decoder alone (no pixel_values: no image tokens before the text)",
           **{**_BERT, "causal": True}),
    Layout(name="rembert", model_types=("rembert",), embeds={"embed": "encoder.embedding_hidden_mapping_in"},
           notes=_ONE_TERM.format("encoder.embedding_hidden_mapping_in"), **_BERT),
    Layout(name="roc_bert", model_types=("roc_bert",), embeds={"embed": "embeddings"},
           notes=("the word, glyph and pronunciation embeddings, the positions and the token types are summed and "
                  "normalised inside the embeddings module (partly in place), so its output is the one term, embed"),
           **_BERT),
    Layout(name="roformer", model_types=("roformer",), when=lambda config: config.embedding_size == config.hidden_size,
           embeds={"embed": "embeddings.word_embeddings", "token_type_embed": "embeddings.token_type_embeddings"},
           after_embeds=_EMBED_NORM, **_ROFORMER),
    Layout(name="roformer-projected", model_types=("roformer",), embeds={"embed": "embeddings_project"},
           notes=_ONE_TERM.format("embeddings_project"), **_ROFORMER),
    Layout(name="electra", model_types=("electra",), when=lambda config: config.embedding_size == config.hidden_size,
           embeds=_BERT_EMBEDS, after_embeds=_EMBED_NORM, **_BERT),
    Layout(name="electra-projected", model_types=("electra",), embeds={"embed": "embeddings_project"},
           notes=_ONE_TERM.format("embeddings_project"), **_BERT),
    Layout(
        name="distilbert",
        model_types=("distilbert",),
        embeds={"embed": "embeddings.word_embeddings", "pos_embed": "embeddings.position_embeddings"},
        after_embeds=(Norm("embeddings.LayerNorm"),),
        layers="transformer.layer",
        block=(Attn("attention.out_lin", **projections("attention", "q_lin", "k_lin", "v_lin")),
               Norm("sa_layer_norm"), Mlp("ffn", down="ffn.lin2", up="ffn.lin1", act="activation"),
               Norm("output_layer_norm")),
        resid_final=("transformer.layer.{last}.output_layer_norm", OUTPUT),
        unembed=False,
        positions="learned",
        causal=False,
    ),
]

LAYOUTS.append(Layout(
    name="modernbert",
    model_types=("modernbert",),
    notes=("pre-LN with a final norm and rotary positions (one table per layer kind); the first layer's "
           "attention norm is an identity, and local layers attend within a two-sided sliding window"),
    embeds={"embed": "embeddings.tok_embeddings"},
    after_embeds=(Norm("embeddings.norm"),),
    layers="layers",
    # Wqkv is [all query heads | all key heads | all value heads]; a local layer's module holds its
    # half-window + 1, and a key is seen while |query - key| is below it
    block=(Attn("attn.Wo", qkv="attn.Wqkv", split="concat", norm="attn_norm",
                window=lambda config, attn: attn.sliding_window),
           Mlp("mlp", down="mlp.Wo", gate_up="mlp.Wi", norm="mlp_norm", act="hidden_activation")),
    resid_final=("final_norm", INPUT),
    final_norm="final_norm",
    unembed=False,
    causal=False,
))

# ModernBERT's causal decoder: separate q/k/v projections, the same embedding norm, identity first attention
# norm and per-kind rotary tables; its head (dense, act, norm, decoder) is not linear, so no unembedding
LAYOUTS.append(Layout(
    name="modernbert-decoder",
    model_types=("modernbert-decoder",),
    notes=("causal ModernBERT: pre-LN with an embedding norm and a final norm, rotary positions (one table per "
           "layer kind), an identity first attention norm, causal sliding windows on local layers; the "
           "prediction head (dense, activation, norm) is not linear, so no unembedding is stored"),
    embeds={"embed": "embeddings.tok_embeddings"},
    after_embeds=(Norm("embeddings.norm"),),
    layers="layers",
    block=(Attn("attn.Wo", **projections("attn"), norm="attn_norm", window=lambda config, attn: attn.sliding_window),
           Mlp("mlp", down="mlp.Wo", norm="mlp_norm")),
    resid_final=("final_norm", INPUT),
    final_norm="final_norm",
    unembed=False,
))

LAYOUTS += [
    Layout(name="megatron-bert", model_types=("megatron-bert",), embeds=_BERT_EMBEDS,
           block=(Attn("attention.output.dense", norm="attention.ln", **_QKV), Mlp("output.dense")),
           resid_final=("encoder.ln", INPUT), final_norm="encoder.ln", **_PRE_LN),
    Layout(name="roberta-prelayernorm", model_types=("roberta-prelayernorm",), embeds=_BERT_EMBEDS,
           after_embeds=_EMBED_NORM,
           block=(Attn("attention.output.dense", norm="attention.LayerNorm", **_QKV), Mlp("output.dense")),
           resid_final=("LayerNorm", INPUT), final_norm="LayerNorm", **_PRE_LN),
    Layout(name="xlm-roberta-xl", model_types=("xlm-roberta-xl",), embeds=_BERT_EMBEDS,
           block=(Attn("attention.output.dense", norm="attention.self_attn_layer_norm", **_QKV), Mlp("output.dense")),
           resid_final=("encoder.LayerNorm", INPUT), final_norm="encoder.LayerNorm", **_PRE_LN),
]

REFUSED = {
    # one AlbertLayer module is run num_hidden_layers times (encoder.albert_layer_groups[g].albert_layers):
    # a tap reads each module's input and output once per forward, so the L layers' terms cannot be told apart
    "albert": ("its encoder applies one shared layer (albert_layer_groups[0].albert_layers[0]) at every depth, "
               "and streamtap binds one module per layer and reads it once per forward, so each depth's attention and MLP terms cannot be "
               "separated; its stream would not add up layer by layer. Models with a module list of their own "
               "blocks are supported"),
}
