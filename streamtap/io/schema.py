"""The store's schema (version 1): one table of every variable, its dimensions and its role.

Readers and writers both take names, dimensions, identity keys and attribute names from here, and
nothing here imports torch. The design behind it is in docs/design.md ("The store").
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

# attributes the commit protocol owns (docs/crash-safety.md)
COMMITTED_TOKENS = "committed_tokens"
COMMITTED_SEQUENCES = "committed_sequences"
INCOMPLETE = "streamtap_incomplete"      # the only attribute of a store whose creation has not finished
STORED_DTYPE = "streamtap_dtype"          # per array: the logical dtype (bfloat16 is kept as its uint16 bits)

# what makes two captures belong in one store: an append must match every one of them
IDENTITY = ("schema_version", "layout", "model_type", "dtype", "neurons", "patterns", "weights_fingerprint",
            "store_dtype", "selection")


@dataclass(frozen=True)
class Variable:
    """One stored (or derived) variable: its dims after ``token`` (per-token) or all of them (static)."""

    dims: tuple[str, ...]
    per_token: bool
    doc: str
    lossy: bool = True       # may be stored in a lossy half precision (store_dtype); else always exact
    derived: bool = False    # computed by ``streamtap.open``, never stored


def _tok(dims, doc, **kw) -> Variable:
    return Variable(tuple(dims), True, doc, **kw)


def _static(dims, doc) -> Variable:
    return Variable(tuple(dims), False, doc)


VARIABLES: dict[str, Variable] = {
    # per token (dims after "token")
    "embed": _tok(("d_model",), "the token embedding term as it enters the stream"),
    "pos_embed": _tok(("d_model",), "the learned position embedding term"),
    "token_type_embed": _tok(("d_model",), "the token-type embedding term (BERT-style encoders)"),
    "z": _tok(("layer", "head", "d_head"), "each head's value-weighted mixture, the input of the output projection"),
    "mlp_out": _tok(("layer", "d_model"), "each MLP's output term"),
    "mixer_out": _tok(("layer", "d_model"), "each state-space / convolution / linear-attention mixer's output term "
                      "(hybrid models only; zeros at attention layers)"),
    "neuron_act": _tok(("layer", "neuron"), "each MLP neuron's activation (the down projection's input)"),
    "norm_scale": _tok(("norm",), "each stream or sublayer norm's frozen per-token scale", lossy=False),
    "expert_out": _tok(("layer", "slot", "d_model"), "each routed expert's weighted output, per routing slot"),
    "expert_index": _tok(("layer", "slot"), "which expert each routing slot went to", lossy=False),
    "shared_expert_out": _tok(("layer", "d_model"), "a gated shared expert's output"),
    "resid_final": _tok(("d_model",), "the residual entering the final norm (the reference)", lossy=False),
    "rotary_cos": _tok(("rope", "rotary_dim"), "the rotary cosines each token's queries and keys were turned by",
                       lossy=False),
    "rotary_sin": _tok(("rope", "rotary_dim"), "the rotary sines", lossy=False),
    "alibi": _tok(("head",), "the ALiBi bias each head adds to a score with this token as the key", lossy=False),
    # selective captures only (docs/design.md, "Selective captures"); a default store has none of them
    "rest": _tok(("d_model",), "everything a selective capture left out, as it reaches the final residual "
                 "(enters the replay last, before the final norm)"),
    "projection": _tok(("component", "direction"), "each component's contribution onto each projected direction"),
    "projection_total": _tok(("direction",), "the final residual's projection onto each direction, computed "
                             "from it (the reference the projections sum to)", lossy=False),
    "projection_top_id": _tok(("top",), "the ids of each token's top-k logits (project unembed_top)", lossy=False),
    # derived lazily by streamtap.open
    "head_output": _tok(("layer", "head", "d_model"), "each head's output at the query, z @ W_O", derived=True),
    "neuron_out": _tok(("layer", "neuron", "d_model"), "each neuron's output, act * W_out", derived=True),
    # static weights, stored once
    "W_O": _static(("layer", "head", "d_head", "d_model"), "each head's rows of the output projection"),
    "attn_bias": _static(("layer", "d_model"), "the attention output bias"),
    "mlp_bias": _static(("layer", "d_model"), "the MLP's down projection bias"),
    "W_out": _static(("layer", "neuron", "d_model"), "each neuron's output weights"),
    "W_in": _static(("layer", "d_model", "neuron"), "each neuron's input weights (the up projection; neurons=True)"),
    "b_in": _static(("layer", "neuron"), "the up projection's bias"),
    "W_gate": _static(("layer", "d_model", "neuron"), "a gated MLP's gate projection (neurons=True)"),
    "b_gate": _static(("layer", "neuron"), "the gate projection's bias"),
    "mlp_norm_weight": _static(("layer", "d_model"), "gamma of the norm the MLP reads the stream through"),
    "mlp_norm_bias": _static(("layer", "d_model"), "beta of that norm"),
    "norm_weight": _static(("norm", "d_model"), "gamma of each norm inside the stream"),
    "norm_bias": _static(("norm", "d_model"), "beta of each norm inside the stream"),
    "norm_center": _static(("norm",), "whether each norm inside the stream centres"),
    "final_norm_weight": _static(("d_model",), "gamma of the final norm"),
    "final_norm_bias": _static(("d_model",), "beta of the final norm"),
    "W_U": _static(("vocab", "d_model"), "the unembedding (a linear map after the final norm folded in)"),
    "unembed_bias": _static(("vocab",), "the unembedding's bias"),
    "W_Q": _static(("layer", "head", "d_model", "d_head"), "query weights, before positions"),
    "W_K": _static(("layer", "kv_head", "d_model", "d_head"), "key weights, before positions"),
    "W_V": _static(("layer", "kv_head", "d_model", "d_head"), "value weights"),
    "b_Q": _static(("layer", "head", "d_head"), "query bias"),
    "b_K": _static(("layer", "kv_head", "d_head"), "key bias"),
    "b_V": _static(("layer", "kv_head", "d_head"), "value bias"),
    "attn_norm_weight": _static(("layer", "d_model"), "gamma of the attention's input norm"),
    "attn_norm_bias": _static(("layer", "d_model"), "beta of the attention's input norm"),
    "attn_scale": _static(("layer",), "what the model multiplies q . k by"),
    "attn_sinks": _static(("layer", "head"), "learned sink logits: one more softmax column, no value read"),
    "q_norm_weight": _static(("layer", "q_norm_dim"), "gamma of the query norm (one head's or all heads' width)"),
    "q_norm_bias": _static(("layer", "q_norm_dim"), "beta of the query norm"),
    "k_norm_weight": _static(("layer", "k_norm_dim"), "gamma of the key norm"),
    "k_norm_bias": _static(("layer", "k_norm_dim"), "beta of the key norm"),
    "layer": _static(("layer",), "which layers a selective store keeps (default stores: all, no coordinate)"),
    "head": _static(("head",), "which heads a selective store keeps"),
    "W_E": _static(("vocab", "d_model"), "each token's embedding term (kept once as W_U where identical)"),
}

# token coordinates and their stored dtypes (text: a string array, only with a tokenizer)
COORDS = ("seq", "pos", "token_id", "text")
COORD_DTYPES = {"seq": "int64", "pos": "int32", "token_id": "int64"}
EMBEDDING_DIMS = ("d_model",)   # any variable a layout lists as an embedding


def dims_of(name: str) -> tuple[str, ...]:
    """A variable's dims (after ``token`` for per-token ones); an unknown name is an embedding term."""
    var = VARIABLES.get(name)
    return var.dims if var is not None else EMBEDDING_DIMS


def per_token_names() -> tuple[str, ...]:
    return tuple(n for n, v in VARIABLES.items() if v.per_token)


def is_exact_always(name: str) -> bool:
    """Stored exactly even in a lossy store: the reference, frozen scales and integer indices."""
    var = VARIABLES.get(name)
    return var is not None and not var.lossy


# -- dtypes and chunks ------------------------------------------------------------------------------
def storage_dtype(logical: str) -> np.dtype:
    """The numpy dtype on disk for a logical dtype name; bfloat16 (which numpy lacks) as uint16 bits."""
    return np.dtype("uint16") if logical == "bfloat16" else np.dtype(logical)


def itemsize(logical: str) -> int:
    return storage_dtype(logical).itemsize


CHUNK_TARGET_BYTES = 4 << 20              # chunks below ~1 MB collapse write throughput (docs/benchmarks.md)
LOSSY_DTYPES = ("float16", "bfloat16")   # what a capture may store instead of the compute dtype
# which per-token arrays are compressed unless a capture says otherwise: only where it pays (bfloat16
# activations shrink noticeably, float32/float16 hardly; docs/benchmarks.md, "Storage choices")
COMPRESSED_BY_DEFAULT = ("bfloat16",)


@dataclass(frozen=True)
class VariableSpec:
    """A per-token variable of one store: its shape after ``token`` and its logical dtype name."""

    tail: tuple[int, ...]
    dtype: str


@dataclass
class StoreSpec:
    """Everything needed to create a store, or to check that an append belongs in one.

    ``static``: name -> (numpy array as stored, logical dtype name), written once.
    """

    variables: dict[str, VariableSpec]
    static: dict[str, tuple[np.ndarray, str]]
    attrs: dict[str, Any]
    with_text: bool
    identity: dict[str, Any] = field(default_factory=dict)

    def chunk_tokens(self) -> int:
        """Tokens per chunk, the same for every per-token variable, sized by the widest one (~1-4 MB)."""
        widest = max(math.prod(v.tail) * itemsize(v.dtype) for v in self.variables.values())
        return int(min(4096, max(16, 2 ** round(math.log2(CHUNK_TARGET_BYTES / widest)))))

    def chunks(self, name: str) -> tuple[int, ...]:
        return (self.chunk_tokens(), *self.variables[name].tail)

    def coords(self) -> list[str]:
        return [c for c in COORDS if c != "text" or self.with_text]


def static_chunks(data: np.ndarray) -> tuple[int, ...]:
    """Static weights: one chunk up to 16 MB, else rows of ~4 MB."""
    if data.nbytes <= CHUNK_TARGET_BYTES * 4 or data.ndim == 0:
        return data.shape
    rows = max(1, CHUNK_TARGET_BYTES // (data[0].nbytes or 1))
    return (rows, *data.shape[1:])


def fill_value(dtype: np.dtype):
    """NaN for floats, so that unwritten capacity never reads as a plausible value."""
    return np.nan if np.dtype(dtype).kind == "f" else 0


def fingerprint(static: dict[str, tuple[np.ndarray, str]]) -> str:
    """A hash of the weights that define the terms, so an append from another model is refused."""
    h = hashlib.sha256()
    for name in ("W_O", "attn_bias", "mlp_bias", "final_norm_weight"):
        if name in static:
            h.update(name.encode())
            h.update(np.ascontiguousarray(static[name][0]))  # no copy of a contiguous array
    return h.hexdigest()[:32]


__all__ = ["SCHEMA_VERSION", "COMMITTED_TOKENS", "COMMITTED_SEQUENCES", "INCOMPLETE", "STORED_DTYPE", "IDENTITY",
           "VARIABLES", "Variable", "COORDS", "COORD_DTYPES", "dims_of", "per_token_names", "is_exact_always",
           "storage_dtype", "LOSSY_DTYPES", "COMPRESSED_BY_DEFAULT", "VariableSpec", "StoreSpec", "static_chunks",
           "fill_value", "fingerprint", "CHUNK_TARGET_BYTES", "SELECTIVE_PER_TOKEN", "SUMMARY_GROUP", "SUMMARY_STATS"]

SUMMARY_GROUP = "summaries-{n}"
"""The sub-group holding a store's summaries (``summarise=``); the root attribute ``summaries`` (JSON)
names the current one and says what it covers (docs/analysis.md, "Summaries")."""

SUMMARY_STATS: dict[str, tuple[tuple[str, ...], str]] = {
    # each as ``<group>_<stat>`` in the sub-group, group one of head, mlp, mixer, neuron, projection;
    # dims after ``summary_<group>`` (one row per component)
    "count": ((), "tokens summarised (int64)"),
    "mean": ((), "the running mean (float64)"),
    "m2": ((), "the sum of squared deviations from the mean (float64); var = m2 / count"),
    "min": ((), "the smallest value"),
    "max": ((), "the largest value"),
    "hist": (("bucket",), "the quantile sketch: counts of log-spaced magnitude buckets, both signs and zero"),
    "top_value": (("top",), "the top-k values, largest first (-inf where fewer tokens were seen)"),
    "top_seq": (("top",), "each top value's sequence (-1: none)"),
    "top_pos": (("top",), "each top value's position in its sequence"),
    "top_window": (("top", "window"), "the token ids around each top value (-1 outside the sequence)"),
}

SELECTIVE_PER_TOKEN = ("rest", "projection", "projection_total", "projection_top_id")
"""The per-token variables only a selective capture writes."""
