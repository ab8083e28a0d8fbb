"""The stored attention weights reproduce each model's own queries, keys and values, on every architecture.

A store carries W_Q, W_K, W_V (and b_Q, b_K, b_V where the model has them), the attention's input
norm, its score scale and the token embedding W_E, read from the layouts alone. Each is checked here
against what the model itself computes on a padded batch:

- q, k, v per head, as the model forms them before positions are applied: the outputs of separate
  q/k/v projections; for fused projections, the model's own split (Falcon's ``_split_heads``,
  BLOOM's ``_reshape``), or what reaches the attention function at position 0, where rotary
  embeddings are the identity (GPT-2, GPT-BigCode, GPT-NeoX);
- the projections' input from the block's input through the stored input norm;
- the captured z at each sequence's first position, which attends only to itself, from W_V, b_V
  (independent of the split code: an end-to-end check of the value weights and the key/value
  head of every query head);
- the attention pattern itself from W_Q, W_K and ``attn_scale``, where nothing else acts on the
  scores (no rotary, ALiBi, q/k norms or soft-capping);
- W_E against the captured embedding term of every token.
"""

import sys

import numpy as np
import pytest
import torch
import zarr

import streamtap as st
from streamtap.layouts import bind, layout_for
from streamtap.models import TINY_ARCHS, tiny_model

from _util import padded_batch, run_hooked

LENGTHS = [11, 6, 3]
ENCODERS = {"bert", "roberta"}   # bidirectional: position 0 attends to every token


# The store's own schema, read with xarray alone (docs/design.md, "The store"): a weight kept once under
# another name says so in ``<name>_alias``; grouped-query heads share kv heads in order; ``positional``
# says how positions enter.
def static(ds, name: str, dtype=np.float32) -> np.ndarray:
    stored = name if name in ds else ds.attrs.get(f"{name}_alias", name)
    return np.asarray(ds[stored].values, dtype=dtype)


def kv_heads(ds) -> np.ndarray:
    """For each query head, its key/value head."""
    n_heads = ds.sizes["head"]
    n_kv = ds.sizes["kv_head"] if "kv_head" in ds.dims else n_heads
    assert n_heads % n_kv == 0, (n_heads, n_kv)
    return np.arange(n_heads) // (n_heads // n_kv)


def is_rotary(ds) -> bool:
    return ds.attrs["positional"] == "rotary"


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _heads(x: torch.Tensor, real: torch.Tensor, heads_first: bool) -> np.ndarray:
    """(batch, heads, seq, d_head) or (batch, seq, heads, d_head) -> (real token, heads, d_head)."""
    x = x.transpose(1, 2) if heads_first else x
    return x[real].double().numpy()


def _forward_with_hooks(model, bound, ids, mask, monkeypatch):
    """A plain forward recording, per layer: block input, projection input, reference q, k, v."""
    step, real = bound.attn, mask.bool()
    rec = {layer: {} for layer in range(bound.n_layers)}
    hooks, attn_of = [], {}
    for layer in range(bound.n_layers):
        r = rec[layer]
        block = bound.module(bound.full(f"{bound.layout.layers}.{layer}"))

        def block_hook(m, args, kwargs, r=r):
            r["block_in"] = (args[0] if args else kwargs["hidden_states"]).detach()
        hooks.append(block.register_forward_pre_hook(block_hook, with_kwargs=True))
        if step.qkv:
            proj = bound.module(bound.in_block(layer, step.qkv, "qkv"))
            attn = bound.module(bound.in_block(layer, step.qkv.rsplit(".", 1)[0], "attention"))
            attn_of[id(attn)] = r
            split = getattr(attn, "_split_heads", None) or getattr(attn, "_reshape", None)

            def out_hook(m, args, out, r=r, split=split, heads_first=hasattr(attn, "_reshape")):
                r["x"] = args[0].detach()
                if split is not None:   # the model's own split of its fused projection
                    r["ref"] = [_heads(t, real, heads_first) for t in split(out.detach())]
            hooks.append(proj.register_forward_hook(out_hook))
        else:
            for name, rel in zip("qkv", (step.q, step.k, step.v)):
                proj = bound.module(bound.in_block(layer, rel, name))

                def out_hook(m, args, out, r=r, name=name):
                    r["x"] = args[0].detach()
                    r[name] = out.detach()[real].double().numpy()
                hooks.append(proj.register_forward_hook(out_hook))
    modeling = sys.modules[type(model).__module__]
    eager = getattr(modeling, "eager_attention_forward", None)
    if eager is not None:   # what reaches the attention function, (batch, heads, seq, d_head)
        def probe(module, query, key, value, *args, **kwargs):
            r = attn_of.get(id(module))
            if r is not None and "ref" not in r:
                r["interface"] = [_heads(t, real, True) for t in (query, key, value)]
            return eager(module, query, key, value, *args, **kwargs)
        monkeypatch.setattr(modeling, "eager_attention_forward", probe)
    out = run_hooked(model, hooks, input_ids=ids, attention_mask=mask, output_attentions=True)
    return rec, out.attentions


def _apply_norm(x, gamma, beta, center, eps):
    y = x - x.mean(-1, keepdims=True) if center else x
    y = y / np.sqrt((y ** 2).mean(-1, keepdims=True) + eps) * gamma
    return y + beta if beta is not None else y


PATTERN_CHECKED = {"gpt2", "gpt_neo", "gpt_bigcode", "opt", "opt-post-ln", "bert", "roberta"}
VARIANTS = [   # fused layouts the architecture list does not build: each split kind in its other forms
    ("falcon", {"multi_query": False}),                       # [head, (q, k, v), d_head]
    ("falcon-new", {"num_ln_in_parallel_attn": 1}),           # one input norm, input_layernorm
    ("gpt_bigcode", {"multi_query": False}),                  # [head, (q, k, v), d_head]
    ("phi", {"qk_layernorm": True}),                          # q/k norms noted, not folded
]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_stored_attention_weights_reproduce_the_models_queries_keys_and_values(arch, monkeypatch):
    _check(arch, {}, monkeypatch)


@pytest.mark.parametrize("arch, overrides", VARIANTS, ids=[f"{a}-{next(iter(o))}" for a, o in VARIANTS])
def test_fused_and_noted_variants(arch, overrides, monkeypatch):
    ds = _check(arch, overrides, monkeypatch)
    assert ("attn_notes" in ds.attrs) == ("qk_layernorm" in overrides)


def _check(arch, overrides, monkeypatch):
    model = tiny_model(arch, **overrides)
    ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=5)
    store = zarr.storage.MemoryStore()
    with st.tap(model, store), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    ds = st.open(store)
    bound = bind(layout_for(model), model)
    if bound.attn.no_patterns and not bound.attn.q:   # multi-head latent attention: no per-head W_Q/W_K to store
        assert not {"W_Q", "W_K", "W_V"} & set(ds.data_vars) and ds.sizes["d_head"] == bound.d_head
        return ds
    rec, attentions = _forward_with_hooks(model, bound, ids, mask, monkeypatch)
    real = mask.bool()
    first = (ds.pos.values == 0)
    kv = kv_heads(ds)
    W = {n: static(ds, n, np.float64) for n in ("W_Q", "W_K", "W_V")}
    b = {n: static(ds, f"b_{n}", np.float64) if f"b_{n}" in ds else np.zeros(W[f"W_{n}"].shape[:2] + (1,))
         for n in "QKV"}
    assert ds["W_K"].dims == ("layer", "kv_head", "d_model", "d_head") and W["W_Q"].shape[1] == ds.sizes["head"]
    checked_pattern = False
    for layer in range(bound.n_layers):
        r = rec[layer]
        x = r["x"][real].double().numpy()
        ours = {n: np.einsum("tm,hme->the", x, W[f"W_{n.upper()}"][layer]) + b[n.upper()][layer] for n in "qkv"}
        # 1. the model's own q, k, v per head (before positions are applied)
        if "ref" in r or "interface" in r:
            ref = r.get("ref") or r["interface"]
            rows = slice(None) if "ref" in r else first
            for name, want in zip("qkv", ref):
                got = ours[name] if want.shape[1] == ours[name].shape[1] else ours[name][:, kv]  # broadcast kv heads
                assert _rel(got[rows], want[rows]) <= 1e-5, (arch, layer, name)
        else:
            for name in "qkv":
                got = ours[name].reshape(len(x), -1)
                assert _rel(got, r[name]) <= 1e-5, (arch, layer, name)
        # 2. the projections read the block's input through the stored input norm (or the stream itself)
        resid = r["block_in"][real].double().numpy()
        if "attn_norm_weight" in ds:
            beta = static(ds, "attn_norm_bias", np.float64)[layer] if "attn_norm_bias" in ds else None
            want_x = _apply_norm(resid, static(ds, "attn_norm_weight", np.float64)[layer], beta,
                                 ds.attrs["attn_norm_kind"] == "layernorm", ds.attrs["attn_norm_eps"])
        else:
            want_x = resid
        assert _rel(want_x, x) <= 1e-5, (arch, layer, "input norm")
        # 3. the first token of a causal model attends only to itself: z = v, per query head
        if arch not in ENCODERS:
            z = ds.z.isel(token=first, layer=layer).values.astype(np.float64)
            v = ours["v"][first][:, kv]
            if "attn_sinks" in ds:   # the sink takes a share: z is v times the query's own probability
                share = (z * v).sum(-1, keepdims=True) / (v * v).sum(-1, keepdims=True)
                assert ((share > 0) & (share < 1)).all(), (arch, layer, "sink share")
                v = share * v
            assert _rel(v, z) <= 1e-5, (arch, layer, "z at position 0")
        # 4. the pattern from W_Q, W_K and attn_scale, where nothing else acts on the scores
        if not is_rotary(ds) and "attn_notes" not in ds.attrs and "attn_scale" in ds:
            A = attentions[layer].double().numpy()               # (batch, head, query, key)
            scale = float(ds.attn_scale.values[layer])
            q, k = np.zeros(real.shape + ours["q"].shape[1:]), np.zeros(real.shape + ours["k"].shape[1:])
            q[real.numpy()], k[real.numpy()] = ours["q"], ours["k"]
            s = scale * np.einsum("bqhe,bkhe->bhqk", q, k[:, :, kv])
            allowed = A > 0
            s = np.where(allowed, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p = np.nan_to_num(p / p.sum(-1, keepdims=True))
            rows = real.numpy()[:, None, :, None] & allowed.any(-1, keepdims=True)
            assert np.abs(np.where(rows, p - A, 0)).max() <= 1e-5, (arch, layer, "pattern")
            checked_pattern = True
    assert checked_pattern == (arch in PATTERN_CHECKED)
    # 5. W_E (stored, or W_U where they are the same) is each token's embedding term
    W_E = static(ds, "W_E", np.float64)
    assert _rel(W_E[ds.token_id.values], ds.embed.values) <= 1e-6
    assert ("W_E" in ds) != (ds.attrs.get("W_E_alias") == "W_U")
    return ds


def test_attention_notes_and_scales_are_stored():
    def opened(arch, **kw):
        model = tiny_model(arch, **kw)
        ids, mask = padded_batch(model.config.vocab_size, [4], seed=1)
        store = zarr.storage.MemoryStore()
        with st.tap(model, store), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        return st.open(store)

    gemma2 = opened("gemma2")
    assert any("soft-capped" in n for n in gemma2.attrs["attn_notes"])
    assert np.allclose(gemma2.attn_scale.values, 256 ** -0.5)     # query_pre_attn_scalar, not d_head
    assert any("q_norm" in n for n in opened("qwen3").attrs["attn_notes"])
    assert np.allclose(opened("gpt_neo").attn_scale.values, 1.0)  # GPT-Neo does not scale its scores
    gpt2 = opened("gpt2", scale_attn_by_inverse_layer_idx=True)
    assert np.allclose(gpt2.attn_scale.values, [16 ** -0.5, 16 ** -0.5 / 2])
    assert "attn_notes" not in opened("llama").attrs
