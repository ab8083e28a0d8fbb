"""What the analyses read from a store besides per-token data: weights, the final norm, the
architecture's facts (from the store's attributes, written by its layout), and what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from ..errors import StreamtapError
from ..stream import apply_norm, fold_direction, norm_scale


class MissingWeightsError(StreamtapError):
    """The store lacks a static weight that an analysis needs; the message names it."""


def local(x):
    """Compute a small lazy object in this process (the synchronous scheduler): a round trip to a
    cluster for a few megabytes of weights costs more than reading them."""
    return x.compute(scheduler="sync") if hasattr(x, "compute") else x


def static(ds: xr.Dataset, name: str, dtype=np.float32) -> np.ndarray:
    """A static weight, read here (weights are small next to the per-token data)."""
    require(ds, name)
    return np.asarray(local(ds[stored_name(ds, name)]).values, dtype=dtype)


def stored_name(ds: xr.Dataset, name: str) -> str:
    """The variable that holds ``name``: itself, or the one a store keeps it as (attribute
    ``<name>_alias``; W_E is kept once as W_U where the two are equal bit for bit)."""
    if name in ds:
        return name
    alias = ds.attrs.get(f"{name}_alias")
    return alias if alias is not None and alias in ds else name


def require(ds: xr.Dataset, *names: str) -> None:
    """Raise ``MissingWeightsError`` naming those of ``names`` the store lacks, and how to get the first."""
    missing = [n for n in names if stored_name(ds, n) not in ds]
    if missing:
        raise MissingWeightsError(
            f"this store has no {', '.join(missing)}; the analysis needs it. "
            + _WHY.get(missing[0], "Capture again with a streamtap that stores it."))


_WHY = {
    "W_U": "Capture from a model with an LM head (the unembedding is stored with it).",
    "neuron_act": "Capture with neurons=True (--neurons) to store neuron activations and W_out.",
    "W_out": "Capture with neurons=True (--neurons) to store neuron activations and W_out.",
    "W_Q": "Its layout does not locate the query, key and value projections; complete the store with "
           "ds.assign(W_Q=..., W_K=..., W_V=...).",
    "W_E": "Its model has no token embedding streamtap can read; complete the store with ds.assign(W_E=...).",
}
_WHY["W_K"] = _WHY["W_V"] = _WHY["W_Q"]


@dataclass(frozen=True)
class FinalNorm:
    """The final norm as plain numbers: gamma * (x - [mean x]) * s + beta with s = 1/sqrt(var + eps)."""

    center: bool
    eps: float
    gamma: np.ndarray
    beta: np.ndarray | None

    def scale(self, x):
        """The per-token scale s of x (..., d_model), frozen: a function of x alone."""
        return norm_scale(x, self.center, self.eps)

    def apply(self, x):
        """N(x), each row with its own scale."""
        return apply_norm(x, self.gamma, self.beta, self.center, self.eps)

    def fold(self, u):
        """The direction w with s * (x . w) the effect of a term x on u . N(x_total), beta aside."""
        return fold_direction(u, self.gamma, self.center)


def final_norm(ds: xr.Dataset, dtype=np.float32) -> FinalNorm:
    """The store's final norm (kind and eps from its attributes, gamma and beta from its weights)."""
    return FinalNorm(center=ds.attrs["final_norm_kind"] == "layernorm", eps=float(ds.attrs["final_norm_eps"]),
                     gamma=static(ds, "final_norm_weight", dtype),
                     beta=static(ds, "final_norm_bias", dtype) if "final_norm_bias" in ds else None)


def embedding_matrix(ds: xr.Dataset) -> xr.DataArray:
    """W_E (vocab, d_model): each token's embedding term; stored, or W_U where the two are equal."""
    require(ds, "W_E")
    return ds[stored_name(ds, "W_E")]


def kv_heads(ds: xr.Dataset) -> np.ndarray:
    """For each query head, its key/value head (grouped-query attention repeats each kv head)."""
    n_heads = ds.sizes["head"]
    n_kv = ds.sizes["kv_head"] if "kv_head" in ds.dims else n_heads
    if n_heads % n_kv:
        raise StreamtapError(f"{n_heads} query heads do not divide among {n_kv} key/value heads")
    return np.arange(n_heads) // (n_heads // n_kv)


def per_query_head(ds: xr.Dataset, name: str, dtype=np.float32) -> np.ndarray:
    """W_K or W_V as (layer, head, d_model, d_head): each query head gets its kv head's weight."""
    w = static(ds, name, dtype)
    if "kv_head" in ds[name].dims:
        w = w[:, kv_heads(ds)]
    return w


# -- the architecture's facts, as the layout recorded them ------------------------------------------
def logit_softcap(ds: xr.Dataset) -> float | None:
    """The model's final logit soft-capping (logits = cap * tanh(logits / cap)), if any."""
    cap = ds.attrs.get("final_logit_softcap")
    return float(cap) if cap else None


def positional(ds: xr.Dataset) -> str:
    """How positions enter the model: "rotary", "learned", "alibi" or "none"."""
    return str(ds.attrs["positional"])


def is_rotary(ds: xr.Dataset) -> bool:
    """Whether the model rotates queries and keys by position (RoPE)."""
    return positional(ds) == "rotary"
