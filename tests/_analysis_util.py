"""Shared builders for the analysis tests: a tapped forward of a tiny model, with the model's own outputs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import zarr

import streamtap as st
from streamtap.models import tiny_model

from _util import padded_batch

LENGTHS = [11, 6, 3]


@dataclass
class Tapped:
    """A store of one tapped forward and what the model itself returned for the real tokens."""

    model: torch.nn.Module
    ds: object
    logits: np.ndarray          # (token, vocab), float64
    hidden: list[np.ndarray]    # hidden_states[l] for the real tokens, (token, d_model)
    ids: torch.Tensor
    mask: torch.Tensor
    store: object


def tap_forward(arch: str, *, store=None, neurons: bool = False, lengths=LENGTHS, seed: int = 0,
                chunks=None, **overrides) -> Tapped:
    model = tiny_model(arch, **overrides)
    ids, mask = padded_batch(min(model.config.vocab_size, 128), lengths, seed=seed)
    store = zarr.storage.MemoryStore() if store is None else store
    with st.tap(model, store, neurons=neurons), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    logits = out.logits[real].double().numpy()
    hidden = [h[real].double().numpy() for h in out.hidden_states]
    with warnings.catch_warnings():
        # blocks smaller than the stored chunks, so that a few tokens make several blocks
        warnings.filterwarnings("ignore", message="The specified chunks separate")
        ds = st.open(store, chunks=chunks)
    return Tapped(model, ds, logits, hidden, ids, mask, store)


def sublayer_inputs(model, ids, mask, module_name: str) -> list[np.ndarray]:
    """What a named submodule of every block receives, for the real tokens (a plain forward with hooks)."""
    blocks = model.base_model.layers if hasattr(model.base_model, "layers") else model.base_model.h
    seen: list[torch.Tensor] = []
    hooks = [getattr(b, module_name).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
             for b in blocks]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return [x[mask.bool()].double().numpy() for x in seen]


def close(a, b, rel: float = 1e-5) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.abs(a - b).max() <= rel * max(np.abs(b).max(), 1.0))
