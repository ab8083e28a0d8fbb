"""Post-LN encoders: BERT and RoBERTa.

The embeddings (word, position, token type) pass through a LayerNorm, and each block normalises
the whole stream after attention and after the MLP. The final residual is the last block's
output; every earlier term is carried through each later norm with its frozen per-token scale,
and each norm's beta is a term of its own. The masked-LM head is not linear, so no unembedding
is stored.
"""

from .spec import OUTPUT, Attn, Layout, Mlp, Norm, projections

LAYOUTS = [
    Layout(
        name="bert",
        model_types=("bert", "roberta"),
        embeds={"embed": "embeddings.word_embeddings", "pos_embed": "embeddings.position_embeddings",
                "token_type_embed": "embeddings.token_type_embeddings"},
        after_embeds=(Norm("embeddings.LayerNorm"),),
        layers="encoder.layer",
        block=(Attn("attention.output.dense", **projections("attention.self", "query", "key", "value")),
               Norm("attention.output.LayerNorm"),
               Mlp("output.dense"), Norm("output.LayerNorm")),
        resid_final=("encoder.layer.{last}.output.LayerNorm", OUTPUT),
        unembed=False,
        positions="learned",
        causal=False,
    ),
]
