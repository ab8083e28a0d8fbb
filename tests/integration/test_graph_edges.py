"""Exact attribution edges (``st.analysis.ov_edges``, ``qk_edges``, ``mlp_edges``) against the model itself.

The reference is computed by the test's own hooks on the unmodified model, never by the tap:

- OV: the input of each layer's output projection (the model's z), head h's slice times its rows of the
  output projection, at every real query of a padded batch;
- QK: the model's own pre-softmax scores, scaling * q . k of the queries and keys its attention function
  receives (after rotary, q/k norms), recorded by registering an attention function with transformers'
  ``AttentionInterface`` that records and then runs the model's own eager attention; where a model does
  not route through that interface, the differences of the logs of its eager probabilities
  (``output_attentions``), which equal the score differences within a row;
- MLP: the outputs of the MLP's own up and gate projections.

Every edge kind sums to that reference within 1e-5 relative in float32 on every tiny architecture the
edges support; the others are refused with an error naming why.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import zarr

import streamtap as st
from streamtap.analysis.edges import EdgeError, SequenceEdges
from streamtap.errors import PatternsMissingError, StreamtapError
from streamtap.layouts import Mlp, bind, layout_for
from streamtap.models import TINY_ARCHS, tiny_model

from _util import padded_batch

LENGTHS = [7, 4]
REL = 1e-5
REFUSED = {"deepseek_v2": "multi-head latent attention", "deepseek_v3": "multi-head latent attention",
           "hunyuan_v1_moe": "query and key norms act after the rotary rotation"}
ARCHS = [a for a in TINY_ARCHS if a not in REFUSED]
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2", "deepseek_v3", "phimoe", "ernie4_5_moe",
       "glm4_moe", "dots1", "hunyuan_v1_moe", "flex_olmo", "granitemoe"}
MLP_ARCHS = [a for a in TINY_ARCHS if a not in MOE]   # every dense MLP (attention's refusals do not matter here)


class Recorder:
    """An attention function registered with transformers that records each call's q, k and scaling and
    then runs the calling model's own eager attention."""

    def __init__(self):
        self.calls: dict[int, tuple] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kw):
        layer = getattr(module, "layer_idx", len(self.calls))
        self.calls[layer] = (query.detach().double(), key.detach().double(), scaling, kw.get("softcap"))
        eager = sys.modules[type(module).__module__].eager_attention_forward
        return eager(module, query, key, value, attention_mask, scaling=scaling, **kw)


def capture(arch: str, *, neurons: bool = False, dtype="float32", **overrides):
    model = tiny_model(arch, dtype=dtype, **overrides)
    ids, mask = padded_batch(min(model.config.vocab_size, 128), LENGTHS, seed=1)
    store = zarr.storage.MemoryStore()
    with st.tap(model, store, patterns=True, neurons=neurons), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return model, ids, mask, st.open(store)


def hooked(model, ids, mask, modules, *, inputs: bool):
    """{name: tensor} the first input (or output) of each named module in a plain forward."""
    seen, hooks = {}, []
    for name, m in modules.items():
        if inputs:
            hooks.append(m.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].detach())))
        else:
            hooks.append(m.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o.detach())))
    with torch.no_grad():
        try:
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        finally:
            while hooks:
                hooks.pop().remove()
    return seen, out


def real(t: torch.Tensor, mask, row: int) -> np.ndarray:
    """The real tokens of ``row`` of a (batch, token, ...) tensor, or of a flattened (batch x token, ...) one."""
    if t.shape[0] != mask.shape[0]:
        t = t.reshape(mask.shape[0], mask.shape[1], *t.shape[1:])
    return t[row][mask[row].bool()].double().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("arch", ARCHS)
def test_ov_edges_sum_to_the_models_head_output(arch):
    captured = capture(arch)
    worst = ov_error(captured)
    assert worst <= st.tolerance(captured[3]), f"{arch}: OV edges miss the head output by {worst:.3g} relative"


def ov_error(captured) -> float:
    """The worst relative miss of ov_edges' sums against the model's own head outputs (its o_proj input)."""
    model, ids, mask, ds = captured
    bound = bind(layout_for(model), model)
    L, H, dh = bound.n_layers, bound.n_heads, bound.d_head
    projs = {layer: bound.module(bound.taps[f"z.{layer}"][0]) for layer in range(L)}
    seen, _ = hooked(model, ids, mask, projs, inputs=True)
    W_O = ds["W_O"].values.astype(np.float64)
    worst = 0.0
    for row in range(len(LENGTHS)):
        ctx = SequenceEdges(ds, row)
        for layer in range(L):
            z = real(seen[layer], mask, row).reshape(-1, H, dh)
            for head in range(H):
                for query in (0, ctx.n - 1):
                    edges = st.analysis.ov_edges(ctx, row, layer, head, query)
                    reference = z[query, head] @ W_O[layer, head]
                    total = edges.sum(("component", "source")).values
                    worst = max(worst, rel_err(total, reference))
                    along = st.analysis.ov_edges(ctx, row, layer, head, query, direction=W_O[layer, head, 0])
                    assert np.allclose(along.values, edges.values @ W_O[layer, head, 0], rtol=1e-9, atol=1e-12)
    return worst


@pytest.mark.parametrize("arch", ARCHS)
def test_qk_edges_sum_to_the_models_own_score(arch, monkeypatch):
    worst = qk_error(capture(arch), monkeypatch)
    assert worst <= REL, f"{arch}: QK edges miss the model's score by {worst:.3g} relative"


def qk_error(captured, monkeypatch, recorded_only: bool = False) -> float:
    """The worst relative miss of qk_edges' sums against the model's own pre-softmax scores (module docstring).
    ``recorded_only``: the model must pass its q and k through the attention interface (in half precision the
    log of a rounded probability, the other reference, is itself off by a unit roundoff or underflows)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    model, ids, mask, ds = captured
    recorder = Recorder()
    AttentionInterface.register("streamtap_test_scores", recorder)
    AttentionMaskInterface.register("streamtap_test_scores", eager_mask)   # the additive mask eager attention takes
    monkeypatch.setattr(model.config, "_attn_implementation", "streamtap_test_scores", raising=False)
    try:
        _, out = hooked(model, ids, mask, {}, inputs=True)
    finally:
        model.config._attn_implementation = "eager"
    L, H = ds.sizes["layer"], ds.sizes["head"]
    worst = 0.0
    for row in range(len(LENGTHS)):
        ctx = SequenceEdges(ds, row)
        keep = mask[row].bool().numpy()
        n = ctx.n
        for layer in range(L):
            for head in range(H):
                pairs = [(n - 1, 0), (n - 1, n - 1), (n // 2, 1)] if ds.attrs["causal"] else [(0, n - 1), (n - 1, 0)]
                for i, j in pairs:
                    if not ctx.att.visible(layer, ctx.pos[[i]], ctx.pos[[j]])[0, 0]:   # a window hides it
                        with pytest.raises(StreamtapError, match="does not see key"):
                            st.analysis.qk_edges(ctx, row, layer, head, i, j)
                        continue
                    e = st.analysis.qk_edges(ctx, row, layer, head, i, j)
                    total = float(e.matrix.sum()) + float(e.alibi)
                    assert np.isclose(total, float(e.score), rtol=1e-9, atol=1e-9)
                    assert np.allclose(e.by_query_term.sum(), e.matrix.sum()) and np.allclose(e.by_key_term.sum(), e.matrix.sum())
                    if layer in recorder.calls:
                        q, k, scaling, _ = recorder.calls[layer]
                        q, k = q[row][:, keep], k[row][:, keep]
                        kv = head // (q.shape[0] // k.shape[0])
                        ref = float(scaling * (q[head, i] @ k[kv, j])) + float(e.alibi)
                        scale = max(abs(ref), float(np.abs(scaling * (q[head] @ k[kv].T).numpy()).max()))
                    else:   # the model's own probabilities: log A[i, j] - log A[i, i'] = score difference
                        assert not recorded_only, "the model's attention did not go through AttentionInterface"
                        A = out.attentions[layer][row, head][keep][:, keep].double().numpy()
                        other = int(np.argmax(A[i]))
                        ref = np.log(A[i, j]) - np.log(A[i, other])
                        other_score = float(st.analysis.qk_edges(ctx, row, layer, head, i, other).score)
                        total, scale = total - other_score, max(abs(other_score), 1.0)
                    worst = max(worst, abs(total - ref) / scale)
    return worst


@pytest.mark.parametrize("arch", MLP_ARCHS)
def test_mlp_edges_sum_to_the_models_pre_activations(arch):
    model, ids, mask, ds = capture(arch, neurons=True)
    worst = mlp_error(model, ids, mask, ds)
    assert worst <= REL, f"{arch}: MLP edges miss the model's pre-activations by {worst:.3g} relative"


@pytest.mark.parametrize("name", ["distilbert", "electra-projected", "modernbert"])
def test_mlp_edges_of_the_other_encoders(name):
    """The encoders outside TINY_ARCHS (test_encoder_patterns builds them): DistilBERT's post-LN block,
    ELECTRA's projected embeddings, ModernBERT's fused [gate | up] projection and its mlp_norm."""
    from test_encoder_patterns import encoder

    model = encoder(name)
    ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1, side="right")
    ids[ids < 4] += 4
    ids[mask == 0] = model.config.pad_token_id
    store = zarr.storage.MemoryStore()
    with st.tap(model, store, neurons=True), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    worst = mlp_error(model, ids, mask, st.open(store))
    assert worst <= REL, f"{name}: MLP edges miss the model's pre-activations by {worst:.3g} relative"


def mlp_error(model, ids, mask, ds) -> float:
    """The worst relative miss of mlp_edges' sums against the model's own up/gate projection outputs."""
    bound = bind(layout_for(model), model)
    step = next(s for s in bound.layout.block if isinstance(s, Mlp))
    mods = {}
    for layer in range(bound.n_layers):
        for name, rel in (("up", step.up), ("gate", step.gate), ("gate_up", step.gate_up)):
            if rel:
                mods[(name, layer)] = bound.module(bound.in_block(layer, rel, name))
    assert mods, f"{bound.name}: the layout declares no MLP input projection"
    seen, _ = hooked(model, ids, mask, mods, inputs=False)
    for layer in range(bound.n_layers):   # a fused projection's output is [gate | up], as the model splits it
        if ("gate_up", layer) in seen:
            seen[("gate", layer)], seen[("up", layer)] = seen.pop(("gate_up", layer)).chunk(2, dim=-1)
    worst = 0.0
    for row in range(len(LENGTHS)):
        for layer in range(bound.n_layers):
            for position in (0, -1):
                e = st.analysis.mlp_edges(ds, row, layer, position)
                for name in ("up", "gate"):
                    if (name, layer) in seen:
                        ref = real(seen[(name, layer)], mask, row)[position]
                        worst = max(worst, rel_err(e[name].sum("component").values, ref))
                assert ("gate" in e) == (("gate", 0) in seen) and e.act.shape == (ds.sizes["neuron"],)
    return worst


HALF = [(arch, dtype) for arch in ("llama", "gpt2", "qwen3", "opt") for dtype in ("bfloat16", "float16")]


@pytest.mark.parametrize("arch,dtype", HALF)
def test_half_precision_edges_within_the_published_tolerance(arch, dtype, monkeypatch):
    """bfloat16 and float16 captures: OV, QK and MLP edges, recomputed in float64 from the stored half-precision
    terms, sum to the model's own head outputs, scores (its q and k, recorded) and pre-activations within
    st.tolerance, the bound the store's own invariants are held to ((3 n_layers + 1) unit roundoffs)."""
    captured = capture(arch, dtype=dtype, neurons=True)
    ds = captured[3]
    errors = {"ov": ov_error(captured), "qk": qk_error(captured, monkeypatch, recorded_only=True),
              "mlp": mlp_error(*captured)}
    assert max(errors.values()) <= st.tolerance(ds), f"{arch} {dtype}: {errors} > {st.tolerance(ds):.3g}"


def test_refused_where_exactness_is_impossible():
    _, _, _, ds = capture("olmo", clip_qkv=0.5)
    with pytest.raises(EdgeError, match="clips queries, keys and values"):
        st.analysis.ov_edges(ds, 0, 0, 0, -1)
    with pytest.raises(EdgeError, match="not linear"):
        st.analysis.qk_edges(ds, 0, 0, 0, -1, 0)


def test_bad_input_names_the_problem():
    _, _, _, ds = capture("llama")
    with pytest.raises(StreamtapError, match="position 9 is out of range.*7 tokens"):
        st.analysis.ov_edges(ds, 0, 0, 0, 9)
    with pytest.raises(StreamtapError, match="sequence 5 is not in the store"):
        st.analysis.qk_edges(ds, 5, 0, 0, 0, 0)
    with pytest.raises(StreamtapError, match="query 2 does not see key 5"):
        st.analysis.qk_edges(ds, 0, 0, 0, 2, 5)
    with pytest.raises(StreamtapError, match="head 7 is out of range"):
        st.analysis.ov_edges(ds, 0, 0, 7, 0)
    with pytest.raises(st.analysis.MissingWeightsError, match="W_in"):
        st.analysis.mlp_edges(ds, 0, 0, 0)
    model = tiny_model("llama")
    store = zarr.storage.MemoryStore()
    with st.tap(model, store), torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    with pytest.raises(PatternsMissingError, match="--patterns"):
        st.analysis.ov_edges(st.open(store), 0, 0, 0, 0)
