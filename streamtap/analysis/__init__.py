"""Offline analyses of a store: they need nothing but ``st.open(path)`` (the store carries its weights)."""
from .attribution import direct_logit_attribution, final_norm_scale
from .decomposition import residual, residual_stream, residual_terms
from .lens import logit_lens
from .head_vocab import head_vocab
from .circuits import ov_matrix, promotion, qk_matrix, relevance
from .rank import effective_rank, singular_values
from .empty import empty_message_summary, empty_messages, frequency_extremes, token_frequencies
from .accumulation import accumulation_pca
from .neurons import neuron_memories
from ._common import MissingWeightsError, token_ids, vocab_text
