"""Offline analyses of a store: they need nothing but ``st.open(path)`` (the store carries its weights).

Every per-token analysis is lazy (dask) and works one token chunk at a time, so it runs over stores
larger than memory and on a ``dask.distributed`` cluster alike; weight-only analyses are computed
at once. Each returns labelled xarray objects.

=====================================  =======================================================  ===================================
analysis                               returns                                                  module
=====================================  =======================================================  ===================================
``residual_terms(ds, layer, site)``    terms summing to the residual entering a layer's          decomposition
                                       attention or MLP: (component, token, d_model)
``residual(ds, layer, site)``          that residual: (token, d_model)                          decomposition
``residual_stream(ds)``                the residual at every depth: (token, depth, d_model)     decomposition
``direct_logit_attribution(ds, t)``    contributions to a logit (difference): (component, token)  attribution
``logit_lens(ds)``                     top-k tokens at every depth: (token, depth, k)           lens
``head_vocab(ds)``                     each message's top/bottom tokens: (token, layer, head, k)  head_vocab
``qk_matrix(ds)``, ``ov_matrix(ds)``   fused W_QK, W_OV: (layer, head, d_model, d_model)        circuits
``relevance(ds, tokens)``              E W_QK E^T: (layer, head, query, key)                    circuits
``promotion(ds, tokens)``              E W_OV W_U^T: (layer, head, source, target)              circuits
``effective_rank(ds)``                 effective ranks (layer, head, matrix), truncation        rank
                                       errors (layer, head, matrix, rank)
``empty_messages(ds)``                 source-message norms relative to the head's typical one,  empty
                                       cosines with frequent/rare tokens and random controls:
                                       (token, layer, head)
``empty_message_summary(em)``          near-empty shares per head, first token apart; the       empty
                                       distribution of relative norms: (layer, head), (group, bin)
``attention(ds, seq)``                 attention probabilities: (layer, head, query, key)       patterns
``source_messages(ds)``                what each token sends through each head:                 patterns
                                       (token, layer, head, d_model)
``head_scores(ds)``                    sink mass, off share, previous-token, duplicate-token,   heads
                                       induction scores: (layer, head)
``qk_agreement(ds)``                   W_QK map vs the real scores: (layer, head)               heads
``head_views(ds)``                     what each head looks for (W_QK query/key sides) and      views
                                       says (W_OV source/target sides), top singular
                                       directions named by tokens: (layer, head, direction, k)
``ov_edges(ds, seq, l, h, i)``         what a head moved: its output as (term, source) parts     edges
``qk_edges(ds, seq, l, h, i, j)``      why it attended: score as query x key term matrix         edges
``mlp_edges(ds, seq, l, i)``           what drove each neuron: pre-activations by term           edges
``attribution_graph(ds, seq, target)``  a logit explained through exact edges, pruned with    graph
                                       a ``rest`` node per node: nodes, edges, QK tables; JSON
``accumulation_pca(ds)``               PCA over depth per token: (token, pc) and (token, k)     accumulation
``neuron_memories(ds, neurons)``       keys (top stored tokens) and values (promoted tokens)    neurons
                                       of chosen neurons: (sel, rank)
``summaries(ds)``                      what a capture kept with summarise=: per group (head,    summaries
                                       mlp, neuron, projection) statistics, quantiles and top
                                       contexts: (component, q), (component, rank)
=====================================  =======================================================  ===================================

Analyses that need weights a store lacks raise :class:`MissingWeightsError` naming them.

"""

from ._store import MissingWeightsError
from ._vocab import token_ids, vocab_text
from .accumulation import accumulation_pca
from .attribution import direct_logit_attribution, final_norm_scale
from .circuits import ov_matrix, promotion, qk_matrix, relevance
from .decomposition import residual, residual_stream, residual_terms
from .edges import EdgeError, SequenceEdges, mlp_edges, ov_edges, qk_edges
from .graph import AttributionGraph, attribution_graph
from .empty import empty_message_summary, empty_messages, frequency_extremes, merge_ranks, token_frequencies
from .heads import head_scores, qk_agreement
from .views import head_views
from .head_vocab import head_vocab
from .lens import logit_lens
from .neurons import neuron_memories
from .patterns import attention, source_messages
from .rank import effective_rank, singular_values
from .summaries import summaries

__all__ = [
    "AttributionGraph", "EdgeError", "MissingWeightsError", "attribution_graph", "SequenceEdges", "accumulation_pca", "mlp_edges", "ov_edges", "qk_edges", "attention", "source_messages", "direct_logit_attribution", "effective_rank",
    "empty_message_summary", "empty_messages", "final_norm_scale", "frequency_extremes", "head_scores", "head_views", "head_vocab",
    "merge_ranks", "qk_agreement",
    "logit_lens", "neuron_memories", "ov_matrix", "promotion", "qk_matrix", "relevance", "residual",
    "residual_stream", "residual_terms", "singular_values", "summaries", "token_frequencies", "token_ids", "vocab_text",
]
