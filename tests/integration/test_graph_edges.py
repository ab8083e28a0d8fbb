"""Exact attribution edges (``st.analysis.ov_edges``, ``qk_edges``, ``mlp_edges``) against the model itself.

The reference is computed by the test's own hooks on the unmodified model, never by the tap:

- OV: the input of each layer's output projection (the model's z), head h's slice times its rows of the
  output projection, at every real query of a padded batch;
- QK: the model's own pre-softmax scores, scaling * q . k of the queries and keys its attention function
  receives (after rotary, q/k norms), recorded by registering an attention function with transformers'
  ``AttentionInterface`` that records and then runs the model's own eager attention; where a model does
  not route through that interface (GPT-Neo, BLOOM), the test's hooks on its q/k projections
  (``projected_qk``) and, in float32, also the differences of the logs of its eager probabilities
  (``output_attentions``), which equal the score differences within a row;
- MLP: the outputs of the MLP's own up and gate projections.

Every edge kind sums to that reference within 1e-5 relative in float32 on every tiny architecture the
edges support (OV also over its ``error_scale``, the measure half precision is held to); the others are
refused with an error naming why.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=None)
def capture(arch: str, *, neurons: bool = False, dtype="float32", **overrides):
    """(model, ids, mask, store) of one tapped forward, made once per worker for each set of arguments: the OV,
    QK and MLP tests of an architecture read the same capture (none changes it; qk_error puts back the
    model's attention implementation), and ``by_arch`` keeps them on one worker."""
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


def by_arch(archs) -> list:
    """``archs`` as parameters in one xdist group each, so that an architecture's float32 tests share a worker
    and so its ``capture`` (``--dist loadgroup``)."""
    return [pytest.param(arch, marks=pytest.mark.xdist_group(f"edges-{arch}")) for arch in archs]


@pytest.mark.parametrize("arch", by_arch(ARCHS))
def test_ov_edges_sum_to_the_models_head_output(arch):
    captured = capture(arch, neurons=arch in MLP_ARCHS)   # the MLP test's capture: neurons add a term, change none
    relative, scaled = ov_error(captured)
    tol = st.tolerance(captured[3])
    assert relative <= tol, f"{arch}: OV edges miss the head output by {relative:.3g} relative"
    assert scaled <= tol, f"{arch}: OV edges miss the head output by {scaled:.3g} of their error_scale"


def ov_error(captured) -> tuple[float, float]:
    """The worst miss of ov_edges' sums against the model's own head outputs (its o_proj input), relative to
    the output and over the edges' ``error_scale`` (the second invariant's measure of the same sum, which
    carries the scores' magnitudes: in half precision the recomputed pattern's error grows with them)."""
    model, ids, mask, ds = captured
    bound = bind(layout_for(model), model)
    L, H, dh = bound.n_layers, bound.n_heads, bound.d_head
    projs = {layer: bound.module(bound.taps[f"z.{layer}"][0]) for layer in range(L)}
    seen, _ = hooked(model, ids, mask, projs, inputs=True)
    W_O = ds["W_O"].values.astype(np.float64)
    worst = scaled = 0.0
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
                    scaled = max(scaled, float(np.abs(total - reference).max()) / edges.attrs["error_scale"])
                    along = st.analysis.ov_edges(ctx, row, layer, head, query, direction=W_O[layer, head, 0])
                    assert np.allclose(along.values, edges.values @ W_O[layer, head, 0], rtol=1e-9, atol=1e-12)
    return worst, scaled


@pytest.mark.parametrize("arch", by_arch(ARCHS))
def test_qk_edges_sum_to_the_models_own_score(arch, monkeypatch):
    worst = qk_error(capture(arch, neurons=arch in MLP_ARCHS), monkeypatch)
    assert worst <= REL, f"{arch}: QK edges miss the model's score by {worst:.3g} relative"


def projected_qk(model, ids, mask) -> dict:
    """{layer: (q, k, scaling, None)} as ``Recorder`` records them, for the models whose attention does not go
    through transformers' attention interface, from the test's own hooks on their q/k projections, split into
    heads as the model splits them: GPT-Neo's ``q_proj``/``k_proj`` (scores q . k, unscaled), BLOOM's fused
    ``query_key_value`` ((head, 3, d_head) per token; scores inv_norm_factor * q . k + ALiBi). {} for the rest."""
    kind = model.config.model_type
    if kind == "gpt_neo":
        attns = [m for n, m in model.named_modules() if n.endswith("attn.attention")]
        seen, _ = hooked(model, ids, mask, {(layer, s): getattr(a, f"{s}_proj") for layer, a in enumerate(attns)
                                            for s in "qk"}, inputs=False)

        def heads(t, a):
            return t.view(*t.shape[:-1], a.num_heads, a.head_dim).permute(0, 2, 1, 3).double()
        return {layer: (heads(seen[(layer, "q")], a), heads(seen[(layer, "k")], a), 1.0, None)
                for layer, a in enumerate(attns)}
    if kind == "bloom":
        attns = [m for n, m in model.named_modules() if n.endswith("self_attention")]
        seen, _ = hooked(model, ids, mask, {layer: a.query_key_value for layer, a in enumerate(attns)}, inputs=False)
        out = {}
        for layer, a in enumerate(attns):
            fused = seen[layer].view(*seen[layer].shape[:-1], a.num_heads, 3, a.head_dim).double()
            out[layer] = (fused[..., 0, :].transpose(1, 2), fused[..., 1, :].transpose(1, 2), a.inv_norm_factor, None)
        return out
    return {}


def qk_error(captured, monkeypatch, recorded_only: bool = False) -> float:
    """The worst relative miss of qk_edges' sums against the model's own pre-softmax scores (module docstring):
    its q and k as recorded (the attention interface, or ``projected_qk``'s hooks) and, where the interface
    does not see them and not ``recorded_only``, also the log-probability differences (in float32 the two
    references agree; in half precision the log of a rounded probability is itself off by a unit roundoff or
    underflows, so ``recorded_only`` requires a recorded q and k)."""
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
    recorded = {**projected_qk(model, ids, mask), **recorder.calls}
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
                    assert layer in recorded or not recorded_only, "the model's q and k were not recorded"
                    if layer in recorded:
                        q, k, scaling, _ = recorded[layer]
                        q, k = q[row][:, keep], k[row][:, keep]
                        kv = head // (q.shape[0] // k.shape[0])
                        ref = float(scaling * (q[head, i] @ k[kv, j])) + float(e.alibi)
                        scale = max(abs(ref), float(np.abs(scaling * (q[head] @ k[kv].T).numpy()).max()))
                        worst = max(worst, abs(total - ref) / scale)
                    if layer not in recorder.calls and not recorded_only:
                        # the model's own probabilities: log A[i, j] - log A[i, i'] = score difference
                        A = out.attentions[layer][row, head][keep][:, keep].double().numpy()
                        other = int(np.argmax(A[i]))
                        ref = np.log(A[i, j]) - np.log(A[i, other])
                        other_score = float(st.analysis.qk_edges(ctx, row, layer, head, i, other).score)
                        worst = max(worst, abs(total - other_score - ref) / max(abs(other_score), 1.0))
    return worst


@pytest.mark.parametrize("arch", by_arch(MLP_ARCHS))
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


FLOAT16 = ("llama", "gpt2", "qwen3", "opt", "gemma", "phi3", "gpt_neo", "gpt_bigcode", "bloom")
HALF = [(arch, "bfloat16") for arch in ARCHS] + [(arch, "float16") for arch in FLOAT16]


@pytest.mark.parametrize("arch,dtype", HALF)
def test_half_precision_edges_within_the_published_tolerance(arch, dtype, monkeypatch):
    """bfloat16 and float16 captures: OV, QK and MLP edges, recomputed in float64 from the stored half-precision
    terms, sum to the model's own head outputs (over ov_edges' error_scale, the second invariant's measure of
    that sum), scores (its q and k, recorded) and pre-activations within st.tolerance, the bound the store's
    own invariants are held to ((3 n_layers + 1) unit roundoffs)."""
    dense = arch in MLP_ARCHS
    captured = capture(arch, dtype=dtype, neurons=dense)
    ds = captured[3]
    errors = {"ov": ov_error(captured)[1], "qk": qk_error(captured, monkeypatch, recorded_only=True)}
    if dense:
        errors["mlp"] = mlp_error(*captured)
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
