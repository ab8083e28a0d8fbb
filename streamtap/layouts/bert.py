"""Post-LN encoders: BERT, RoBERTa (XLM-RoBERTa, CamemBERT, Data2Vec-text), ELECTRA and DistilBERT.

The embeddings (word, position, token type) pass through a LayerNorm, and each block normalises
the whole stream after attention and after the MLP. The final residual is the last block's
output; every earlier term is carried through each later norm with its frozen per-token scale,
and each norm's beta is a term of its own. The masked-LM head is not linear, so no unembedding
is stored. DistilBERT is the same block under other names, without token types. ELECTRA is BERT;
where its embedding width differs from the hidden size, ``embeddings_project`` maps the normalised
embeddings into the stream, and its output is then the one embedding term.
"""

from .spec import INPUT, OUTPUT, Attn, Layout, Mlp, Norm, projections

_BERT_EMBEDS = {"embed": "embeddings.word_embeddings", "pos_embed": "embeddings.position_embeddings",
                "token_type_embed": "embeddings.token_type_embeddings"}
_BERT = dict(  # what BERT-named encoders share: post-LN blocks under encoder.layer, no linear head
    layers="encoder.layer",
    block=(Attn("attention.output.dense", **projections("attention.self", "query", "key", "value")),
           Norm("attention.output.LayerNorm"),
           Mlp("output.dense", up="intermediate.dense", act="hidden_act"), Norm("output.LayerNorm")),
    resid_final=("encoder.layer.{last}.output.LayerNorm", OUTPUT),
    unembed=False,
    positions="learned",
    causal=False,
)

LAYOUTS = [
    Layout(name="bert", model_types=("bert", "roberta", "xlm-roberta", "camembert", "data2vec-text"),
           embeds=_BERT_EMBEDS, after_embeds=(Norm("embeddings.LayerNorm"),), **_BERT),
    Layout(name="electra", model_types=("electra",), when=lambda config: config.embedding_size == config.hidden_size,
           embeds=_BERT_EMBEDS, after_embeds=(Norm("embeddings.LayerNorm"),), **_BERT),
    Layout(name="electra-projected", model_types=("electra",), embeds={"embed": "embeddings_project"},
           notes=("the embeddings (word, position, token type, normalised) are mapped into the stream by "
                  "embeddings_project, so they enter as one term, embed"), **_BERT),
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

REFUSED = {
    # one AlbertLayer module is run num_hidden_layers times (encoder.albert_layer_groups[g].albert_layers):
    # a tap reads each module's input and output once per forward, so the L layers' terms cannot be told apart
    "albert": ("its encoder applies one shared layer (albert_layer_groups[0].albert_layers[0]) at every depth, "
               "and streamtap binds one module per layer and reads it once per forward, so each depth's attention and MLP terms cannot be "
               "separated; its stream would not add up layer by layer. Models with a module list of their own "
               "blocks are supported"),
}
