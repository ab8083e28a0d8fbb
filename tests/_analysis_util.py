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


def tap_forward(arch: str, *, store=None, neurons: bool = False, patterns: bool = False, lengths=LENGTHS,
                seed: int = 0, chunks=None, **overrides) -> Tapped:
    model = tiny_model(arch, **overrides)
    ids, mask = padded_batch(min(model.config.vocab_size, 128), lengths, seed=seed)
    store = zarr.storage.MemoryStore() if store is None else store
    with st.tap(model, store, neurons=neurons, patterns=patterns), torch.no_grad():
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
    seen = _recorded(model, ids, mask, [getattr(b, module_name) for b in blocks], inputs=True)
    return [x[mask.bool()].double().numpy() for x in seen]


def _recorded(model, ids, mask, modules, *, inputs: bool) -> list[torch.Tensor]:
    """The first input (or the output) of each of ``modules`` in one plain forward, by hooks of the tests."""
    seen: list[torch.Tensor] = []
    if inputs:
        hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach())) for m in modules]
    else:
        hooks = [m.register_forward_hook(lambda m, a, out: seen.append(out.detach())) for m in modules]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return seen


def close(a, b, rel: float = 1e-5) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.abs(a - b).max() <= rel * max(np.abs(b).max(), 1.0))


def model_source_messages(model, ids, mask) -> np.ndarray:
    """(token, layer, head, d_model) for the real tokens of a Llama-style model: what each token sends
    through each head, from the model's own v_proj outputs (hooks of the test) and o_proj weights."""
    cfg = model.config
    seen = _recorded(model, ids, mask, [b.self_attn.v_proj for b in model.model.layers], inputs=False)
    H, d_head = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    group = H // cfg.num_key_value_heads
    out = []
    for layer, v in enumerate(seen):
        v = v[mask.bool()].double().numpy().reshape(-1, cfg.num_key_value_heads, d_head)
        v = np.repeat(v, group, axis=1)                                                 # (token, head, d_head)
        W = model.model.layers[layer].self_attn.o_proj.weight.detach().double().numpy()  # (d_model, H*d_head)
        out.append(np.einsum("the,mhe->thm", v, W.reshape(-1, H, d_head)))
    return np.stack(out, axis=1)
