"""Attention patterns recomputed from a store (``patterns=True``) against the model's own.

The reference is the model itself: eager attention with ``output_attentions=True``, on the real tokens
of padded batches (right padding, and left padding for decoders). ``st.analysis.attention`` must equal
it within 1e-5 absolute in float32 on every tiny architecture and on variants that switch on each
mechanism a pattern is made of (sliding windows, two rope groups, q/k clip, q/k norms, partial and
interleaved rotary, ALiBi, soft-cap, bidirectional attention). Each variant also shows that its
mechanism matters: with the store's record of it removed, the recomputed pattern misses the model's.
The second invariant (each head's output is the sum over sources of attention times value) is checked
by ``streamtap.attention.output_errors`` and by ``st.verify``. (On SmolLM2: tests/slow/test_patterns_smollm2.py.)
"""

from __future__ import annotations

import re

import dask
import numpy as np
import pytest
import torch
import zarr

import streamtap as st
import streamtap.attention
import streamtap.invariant
from streamtap.errors import PatternsMissingError
from streamtap.models import TINY_ARCHS, tiny_model

from _cli_util import fields, invoke
from _generation_util import by_sequence, expected
from _util import padded_batch

LENGTHS = [11, 6, 3]
BOUND = 1e-5            # absolute, on probabilities, float32
ENCODERS = {"bert", "roberta"}
REFUSED = {"deepseek_v2": "multi-head latent attention", "deepseek_v3": "multi-head latent attention",
           "hunyuan_v1_moe": "norms act after the rotary rotation"}
SINKS = {"gpt_oss"}     # learned sinks take a share of each row: it sums to less than one, as the model's
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def sides(arch: str) -> tuple[str, ...]:
    return ("right",) if arch in ENCODERS else ("right", "left")


def tapped(model, ids, mask, store=None, **options):
    """A patterns store of one forward, and the model's own attention probabilities."""
    store = zarr.storage.MemoryStore() if store is None else store
    with st.tap(model, store, patterns=True, **options), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    return st.open(store), out.attentions


def eager(attentions, mask, row: int) -> np.ndarray:
    """(layer, head, query, key) of the model's probabilities on the real tokens of ``row``."""
    real = mask[row].bool()
    a = torch.stack([layer[row] for layer in attentions]).float()
    return a[:, :, real][:, :, :, real].double().numpy()


def pattern_error(ds, attentions, ids, mask) -> float:
    """max |st.analysis.attention - eager| over every row, layer, head, query and key."""
    worst = 0.0
    for row in range(ids.shape[0]):
        A = st.analysis.attention(ds, row)
        ref = eager(attentions, mask, row)
        assert A.dims == ("layer", "head", "query", "key") and A.shape == ref.shape
        assert A.query_token_id.values.tolist() == ids[row][mask[row].bool()].tolist()
        worst = max(worst, float(np.abs(A.values - ref).max()))
    return worst


def output_error(ds) -> float:
    return max(float(streamtap.attention.output_errors(ds, int(s)).max()) for s in np.unique(ds.seq.values))


def check_store(ds, attentions, ids, mask, bound=BOUND):
    error = pattern_error(ds, attentions, ids, mask)
    assert error <= bound, f"pattern differs from eager attention by {error:.3g} (bound {bound:g})"
    assert output_error(ds) <= st.tolerance(ds)
    err = st.verify(ds)
    assert err.attrs["max_output_error"] <= st.tolerance(ds)
    return error


# -- 1. every architecture, float32 ------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_patterns_equal_eager_attention_on_every_architecture(arch, tmp_path):
    if arch in REFUSED:   # refused up front, naming why, before anything is written
        model = tiny_model(arch)
        with pytest.raises(st.StreamtapError, match=f"patterns=True .* not available .*{REFUSED[arch]}"):
            tapped(model, *padded_batch(model.config.vocab_size, LENGTHS, seed=1), store=tmp_path / "s.zarr")
        assert not (tmp_path / "s.zarr").exists()
        return
    for side in sides(arch):
        model = tiny_model(arch)
        ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1, side=side)
        ds, attentions = tapped(model, ids, mask)
        assert ds.attrs["patterns"] and len(attentions) == ds.sizes["layer"]
        check_store(ds, attentions, ids, mask)
        A = st.analysis.attention(ds, 0, layers=[1], heads=[0, 2])  # a selection is the same numbers
        np.testing.assert_allclose(A.values, eager(attentions, mask, 0)[[1]][:, [0, 2]], rtol=0, atol=BOUND)
        rows = eager(attentions, mask, 0)[[1]][:, [0, 2]].sum(-1) if arch in SINKS else 1.0
        np.testing.assert_allclose(A.sum("key").values, rows, rtol=0, atol=1e-12 if arch not in SINKS else BOUND)
        if arch in SINKS:
            assert A.sum("key").values.min() < 0.99   # the sinks took a visible share


def _hooks(model) -> list[tuple[str, int, int]]:
    return [(name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()]


def test_a_tap_leaves_the_models_recorded_outputs_alone():
    # transformers installs its output-capturing hooks on the first forward that asks for attentions or
    # hidden states, and marks them installed; the tap keeps both, as a forward without it would have
    model, twin = tiny_model("llama"), tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [5, 3], seed=1)
    kwargs = dict(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        plain = twin(**kwargs)
    for _ in range(2):  # a second tap finds the hooks already there
        with st.tap(model, zarr.storage.MemoryStore()), torch.no_grad():
            inside = model(**kwargs)
        assert (len(inside.attentions), len(inside.hidden_states)) == (2, 3)
        with torch.no_grad():
            after = model(**kwargs)
        assert (len(after.attentions), len(after.hidden_states)) == (2, 3)
        assert _hooks(model) == _hooks(twin)
        assert sorted(model.__dict__) == sorted(twin.__dict__)
        for got, want in zip([*inside.attentions, *after.attentions], [*plain.attentions] * 2):
            assert torch.equal(got, want)


# -- 2. each mechanism, switched on ---------------------------------------------------------------------
def _without(*names):
    return lambda ds: ds.drop_vars([n for n in names if n in ds])


def _attrs(**changes):
    return lambda ds: ds.assign_attrs(**changes)


# (arch, config overrides, what the store must record, a change to that record that must break the match)
VARIANTS = {
    "mistral-window": ("mistral", dict(sliding_window=3), dict(attn_window=[3, 3]), _attrs(attn_window=[None, None])),
    "gemma2-window": ("gemma2", dict(sliding_window=3), dict(attn_window=[3, None]), _attrs(attn_window=[None, None])),
    "gemma2-softcap": ("gemma2", dict(attn_logit_softcapping=1.0), dict(attn_softcap=1.0), _attrs(attn_softcap=None)),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
                     dict(attn_window=[None, 3]), _attrs(attn_window=[None, None])),
    "mixtral-window": ("mixtral", dict(sliding_window=3), dict(attn_window=[3, 3]), _attrs(attn_window=[None, None])),
    "gpt_neo-window": ("gpt_neo", dict(window_size=2), dict(attn_window=[None, 2]), _attrs(attn_window=[None, None])),
    "gemma3-two-ropes": ("gemma3", dict(layer_types=["sliding_attention", "full_attention"], sliding_window=3),
                         dict(attn_window=[3, None]), _attrs(attn_window=[None, None])),  # its ropes: below
    "smollm3-no-rope": ("smollm3", {}, dict(rotary_layers=[True, False]), _attrs(rotary_layers=[True, True])),
    "olmo-clip": ("olmo", dict(clip_qkv=0.5), dict(qkv_clip=0.5), _attrs(qkv_clip=None)),
    "stablelm-qk-norm": ("stablelm", dict(qk_layernorm=True), dict(qk_norm_scope="head", qk_norm_kind="layernorm"),
                         _without("q_norm_weight", "k_norm_weight", "q_norm_bias", "k_norm_bias")),
    "phi-qk-norm": ("phi", dict(qk_layernorm=True), dict(qk_norm_scope="head", qk_norm_kind="layernorm"),
                    _without("q_norm_weight", "k_norm_weight", "q_norm_bias", "k_norm_bias")),
    "gptj-partial-interleaved": ("gptj", {}, dict(rotary_style="interleaved", rotary_order="sin_cos"),
                                 _attrs(rotary_style="half")),
    "gpt_neox-partial": ("gpt_neox", {}, dict(rotary_style="half"), _without("rotary_cos", "rotary_sin")),
    "cohere-repeated-pairs": ("cohere", {}, dict(rotary_style="interleaved_repeated"), _attrs(rotary_style="half")),
    "bloom-alibi": ("bloom", {}, {}, _without("alibi")),
    "bert-bidirectional": ("bert", {}, dict(causal=False), _attrs(causal=True)),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_each_mechanism_matches_eager_attention(name):
    arch, overrides, recorded, broken = VARIANTS[name]
    for side in sides(arch):
        model = tiny_model(arch, **overrides)
        ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1, side=side)
        ds, attentions = tapped(model, ids, mask)
        for key, value in recorded.items():
            assert ds.attrs[key] == value, (key, ds.attrs[key])
        check_store(ds, attentions, ids, mask)
        if broken is not None:  # the mechanism is exercised: without it the pattern is not the model's
            missed = pattern_error(broken(ds), attentions, ids, mask)
            assert missed > 1e-3, f"{name}: the pattern does not depend on the mechanism ({missed:.3g})"


def test_partial_rotary_tables_are_the_rotated_width():
    for arch, width in (("gpt_neox", 4), ("gptj", 4), ("phi", 8), ("llama", 16)):
        model = tiny_model(arch)
        ids, mask = padded_batch(model.config.vocab_size, [5], seed=1)
        ds, _ = tapped(model, ids, mask)
        d_head = ds.attrs["d_head"]
        assert ds.rotary_cos.sizes == {"token": 5, "rope": 1, "rotary_dim": width} and width <= d_head, arch


def test_a_rotary_style_that_does_not_fit_the_stored_tables_is_refused_naming_it():
    """Cohere's tables hold each pair's angle twice; read as GPT-J's one-per-pair tables they would turn
    twice a head's width. Nothing guesses the style from the tables: the mismatch is one clear error."""
    model = tiny_model("cohere")
    ids, mask = padded_batch(model.config.vocab_size, [5], seed=1)
    ds, _ = tapped(model, ids, mask)
    with pytest.raises(st.StreamtapError, match="rotary_style 'interleaved'.* does not describe its tables"):
        st.analysis.attention(ds.assign_attrs(rotary_style="interleaved"), 0).compute()


def test_gemma3_keeps_one_table_per_rope_group():
    model = tiny_model("gemma3", layer_types=["sliding_attention", "full_attention"], sliding_window=3)
    ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1)
    ds, attentions = tapped(model, ids, mask)
    assert ds.rotary_cos.sizes["rope"] == ds.rotary_sin.sizes["rope"] == 2
    groups = list(ds.attrs["rotary_groups"])
    assert groups in ([0, 1], [1, 0])
    cos = ds.rotary_cos.values
    assert np.abs(cos[:, 0] - cos[:, 1]).max() > 1e-3  # local and global layers rotate differently
    check_store(ds, attentions, ids, mask)
    for wrong in ([groups[0]] * 2, [groups[1]] * 2):   # either table for both layers misses one of them
        assert pattern_error(ds.assign_attrs(rotary_groups=wrong), attentions, ids, mask) > 1e-3


def test_source_messages_weighted_by_the_pattern_are_the_head_outputs():
    model = tiny_model("llama-bias")
    ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1)
    ds, _ = tapped(model, ids, mask)
    messages = st.analysis.source_messages(ds, dtype=np.float64)
    assert messages.dims == ("token", "layer", "head", "d_model")
    picked = st.analysis.source_messages(ds, layers=[1], heads=[3], dtype=np.float64)
    np.testing.assert_allclose(picked.values, messages.isel(layer=[1], head=[3]).values, rtol=1e-12, atol=1e-12)
    for seq in range(len(LENGTHS)):
        rows = np.flatnonzero(ds.seq.values == seq)
        rows = rows[np.argsort(ds.pos.values[rows])]
        A = st.analysis.attention(ds, seq).values                        # (layer, head, query, key)
        m = messages.isel(token=rows).values                              # (key, layer, head, d_model)
        got = np.einsum("lhqk,klhm->qlhm", A, m)
        want = ds.head_output.isel(token=rows).values.astype(np.float64)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


# -- 3. half precision -----------------------------------------------------------------------------------
HALF_ARCHS = ("llama", "gpt2", "gemma2", "bloom", "gpt_neox", "bert")
def half_precision_errors(arch, dtype):
    """(max |pattern - eager| in that dtype, max second-invariant error, the bound, the store)."""
    worst, outputs = 0.0, 0.0
    for side in sides(arch):
        model = tiny_model(arch, dtype=dtype)
        ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1, side=side)
        ds, attentions = tapped(model, ids, mask)
        st.verify(ds)
        assert "head_output" in ds   # derived from z and W_O (in float32 on a half store): beside the pattern's inputs
        worst = max(worst, pattern_error(ds, attentions, ids, mask))
        outputs = max(outputs, output_error(ds))
    return worst, outputs, st.tolerance(DTYPE_NAMES[dtype], n_layers=model.config.num_hidden_layers), ds


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("arch", HALF_ARCHS)
def test_half_precision_patterns_within_the_invariants_bound(arch, dtype):
    worst, outputs, bound, ds = half_precision_errors(arch, dtype)
    assert bound == st.tolerance(ds)
    assert worst <= bound, f"{arch} {dtype}: pattern error {worst:.3g} beyond (3L+1)u = {bound:.3g}"
    assert outputs <= bound


def test_a_float16_pattern_computes_beside_the_derived_head_outputs():
    """A float16 store derives head_output from W_O cast to float32; the pattern's graph is built from the
    arrays it reads, so computing both at once (any scheduler) misses no chunk of W_O."""
    model = tiny_model("llama", dtype=torch.float16)
    ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1)
    ds, attentions = tapped(model, ids, mask)
    A = st.analysis.attention(ds, 0)
    for scheduler in ("sync", "threads"):
        pattern, outputs = dask.compute(A.data, ds.head_output.data, scheduler=scheduler)
        assert np.abs(pattern - eager(attentions, mask, 0)).max() <= st.tolerance(ds)
        assert outputs.shape == ds.head_output.shape


@pytest.mark.parametrize("arch, dtype, seed", [
    pytest.param(arch, dtype, seed, id=f"{arch}-{DTYPE_NAMES[dtype]}-seed{seed}") for arch, dtype, seed in
    (("gemma", torch.bfloat16, 0), ("gemma", torch.float16, 0), ("gpt_neo", torch.float16, 0), ("gemma2", torch.float16, 2))
])
def test_verify_accepts_a_genuine_half_precision_patterns_capture(arch, dtype, seed):
    """Captures whose error relative to max |z| exceeded (3L+1)u (gemma float16 1.3e-2 against 3.4e-3):
    measured against the magnitude the model's rounding acts on (``output_scale``) they hold."""
    model = tiny_model(arch, dtype=dtype, seed=seed)
    ids, mask = padded_batch(model.config.vocab_size, [64, *LENGTHS], seed=seed + 1)
    ds, _ = tapped(model, ids, mask)
    err = st.verify(ds)
    assert err.attrs["max_rel_error"] <= st.tolerance(ds) and err.attrs["max_output_error"] <= st.tolerance(ds)


def _scaled_values(ds):
    return ds.assign(W_V=ds.W_V * 1.5)


def _next_heads_pattern(ds):
    """Each head's queries and keys taken from the next head: the pattern of another head."""
    kv = "kv_head" if "kv_head" in ds.W_K.dims else "head"
    return ds.assign(W_Q=ds.W_Q.roll(head=1, roll_coords=False), W_K=ds.W_K.roll({kv: 1}, roll_coords=False))


@pytest.mark.parametrize("wrong", [_scaled_values, _next_heads_pattern], ids=["W_V-x1.5", "next-heads-pattern"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("arch", ["gemma", "llama"])
def test_a_wrong_half_precision_store_misses_the_second_invariant(arch, dtype, wrong):
    """The tolerance that admits the model's own rounding still catches a wrong store in both half
    dtypes, on every sequence (gemma: the largest scores, so the widest tolerance)."""
    model = tiny_model(arch, dtype=dtype)
    ids, mask = padded_batch(model.config.vocab_size, [64, *LENGTHS], seed=1)
    ds, _ = tapped(model, ids, mask)
    bad = wrong(ds.load())
    tol = st.tolerance(ds)
    for seq in range(4):
        assert float(streamtap.attention.output_errors(bad, seq).max()) > 2 * tol
    with pytest.raises(st.DecompositionError, match="differ from the sum over sources of attention times value"):
        st.verify(bad)


# -- 4. generation -----------------------------------------------------------------------------------------
GENERATION = {
    "llama": {}, "gpt2": {}, "gemma2": {},
    "gemma3-two-ropes": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=3),
    "mistral-window": dict(sliding_window=3),
}


@pytest.mark.parametrize("name", [*GENERATION, "bloom"])
def test_generated_sequences_have_the_patterns_of_one_plain_forward(name, tmp_path):
    model = tiny_model(name.split("-")[0], **GENERATION.get(name, {}))
    ids, mask = padded_batch(model.config.vocab_size, [3, 6, 4], seed=1, side="left")
    with st.tap(model, tmp_path / "gen.zarr", patterns=True):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    gen = st.open(tmp_path / "gen.zarr")
    want = expected(ids, mask, out)
    assert by_sequence(gen) == dict(enumerate(want))
    st.verify(gen)  # the second invariant holds on every step's head outputs

    full = out[:, :-1]
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], full.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    with st.tap(model, tmp_path / "plain.zarr", patterns=True), torch.no_grad():
        attentions = model(input_ids=full, attention_mask=full_mask, output_attentions=True).attentions
    plain = st.open(tmp_path / "plain.zarr")
    for seq, tokens in enumerate(want):
        a, b = st.analysis.attention(gen, seq), st.analysis.attention(plain, seq)
        assert a.sizes["query"] == len(tokens) > 4
        assert a.query_token_id.values.tolist() == b.query_token_id.values.tolist() == tokens
        error = float(np.abs(a.values - b.values).max())
        assert error <= BOUND, f"seq {seq}: generated vs plain forward pattern {error:.3g}"
        error = float(np.abs(a.values - eager(attentions, full_mask, seq)).max())
        assert error <= BOUND, f"seq {seq}: generated pattern vs the model's own attention {error:.3g}"


# -- 5. the second invariant can fail ------------------------------------------------------------------------
CHANGED = pytest.mark.xdist_group("patterns-changed-value-map")   # its tests share one worker, so one store


@pytest.fixture(scope="module")
def changed_value_map(tmp_path_factory):
    """A patterns store whose W_V is then scaled by 1.5 in the zarr store; (path, residual errors before).
    Made once for the tests that read it (none writes to it)."""
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1)
    path = tmp_path_factory.mktemp("changed") / "run.zarr"
    tapped(model, ids, mask, store=path)
    before = st.verify(st.open(path))
    assert before.attrs["max_output_error"] <= st.tolerance(st.open(path))
    residual_before = streamtap.invariant.errors(st.open(path)).values
    zarr.open_group(str(path), mode="r+")["W_V"][...] *= 1.5
    return path, residual_before


@CHANGED
def test_a_changed_value_map_misses_the_second_invariant_only(changed_value_map):
    path, residual_before = changed_value_map
    ds = st.open(path)
    # the residual invariant does not read W_V: unchanged, and within its bound
    np.testing.assert_array_equal(streamtap.invariant.errors(ds).values, residual_before)
    assert residual_before.max() <= st.tolerance(ds)
    err = st.verify(ds, raise_on_error=False)
    assert err.attrs["max_rel_error"] <= st.tolerance(ds) < err.attrs["max_output_error"]
    assert err.attrs["problems"] == []
    errors = streamtap.attention.output_errors(ds, 0)
    # every head, every token, far beyond the bound (measured min 1.2e-2: the scale includes the pattern's own rounding)
    assert errors.dims == ("token", "layer", "head") and float(errors.min()) > 100 * st.tolerance(ds)


@CHANGED
def test_verify_names_the_heads_that_miss_the_second_invariant(changed_value_map):
    path, _ = changed_value_map
    with pytest.raises(st.DecompositionError) as caught:
        st.verify(st.open(path))
    message = str(caught.value)
    assert "differ from the sum over sources of attention times value" in message
    assert re.search(r"L[01]H[0-3]", message), message


@CHANGED
def test_cli_verify_fails_a_store_that_misses_the_second_invariant(changed_value_map):
    path, _ = changed_value_map
    assert st.verify(st.open(path), raise_on_error=False).attrs["max_output_error"] > 0.1
    result = invoke("verify", path)
    assert result.exit_code == 1, result.output
    assert "max output error" in result.output and "differ from the sum over sources" in result.output


# -- 6. bad input ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def patterns_store():
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1)
    ds, _ = tapped(model, ids, mask)
    return ds


def test_a_store_without_patterns_is_refused_naming_the_flag():
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1)
    store = zarr.storage.MemoryStore()
    with st.tap(model, store), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    ds = st.open(store)
    assert not ds.attrs.get("patterns") and "rotary_cos" not in ds
    for call in (lambda: st.analysis.attention(ds, 0), lambda: streamtap.attention.output_errors(ds, 0)):
        with pytest.raises(PatternsMissingError, match="--patterns"):
            call()
    assert issubclass(PatternsMissingError, st.StreamtapError)
    err = st.verify(ds)  # the residual invariant alone
    assert "max_output_error" not in err.attrs
    assert st.analysis.source_messages(ds).sizes["token"] == sum(LENGTHS)  # messages need no patterns


def test_out_of_range_sequence_layer_and_head_name_the_valid_range(patterns_store):
    ds = patterns_store
    with pytest.raises(st.StreamtapError, match=r"sequence 3 is not in the store; its sequences are 0\.\.2"):
        st.analysis.attention(ds, 3)
    with pytest.raises(st.StreamtapError, match=r"sequence -1 .*0\.\.2"):
        st.analysis.attention(ds, -1)
    with pytest.raises(st.StreamtapError, match=r"layer \[2\] out of range: this store has layers 0\.\.1"):
        st.analysis.attention(ds, 0, layers=[0, 2])
    with pytest.raises(st.StreamtapError, match=r"head \[4\] out of range: this store has heads 0\.\.3"):
        st.analysis.attention(ds, 0, heads=4)
    with pytest.raises(st.StreamtapError, match=r"head \[-1\] out of range"):
        st.analysis.attention(ds, 0, heads=[-1])
    with pytest.raises(st.StreamtapError, match=r"layer \[5\] out of range: this store has layers 0\.\.1"):
        st.analysis.source_messages(ds, layers=5)
    with pytest.raises(st.StreamtapError, match="sequence 9 is not in the store"):
        streamtap.attention.output_errors(ds, 9)


def test_a_sequence_longer_than_max_tokens_is_refused(patterns_store):
    ds = patterns_store
    with pytest.raises(st.StreamtapError, match=r"sequence 0 has 11 tokens, more than max_tokens=10"):
        st.analysis.attention(ds, 0, max_tokens=10)
    assert st.analysis.attention(ds, 0, max_tokens=11).sizes["query"] == 11
    assert st.analysis.attention(ds, 0, max_tokens=None).sizes["query"] == 11


def test_falcon_with_alibi_is_refused_up_front(tmp_path):
    model = tiny_model("falcon", alibi=True)
    path = tmp_path / "run.zarr"
    with pytest.raises(st.StreamtapError, match="ALiBi") as caught:
        st.tap(model, path, patterns=True)
    assert "patterns=True (--patterns)" in str(caught.value)
    with pytest.raises(st.StreamtapError, match="ALiBi"):
        st.capture(model, [[5, 6, 7]], path, patterns=True)
    assert not path.exists()


def test_falcon_with_alibi_writes_nothing_with_patterns_and_captures_without(tmp_path):
    model = tiny_model("falcon", alibi=True)
    path = tmp_path / "run.zarr"
    with pytest.raises(st.StreamtapError, match="ALiBi"):
        st.capture(model, [[5, 6, 7]], path, patterns=True)
    assert not path.exists()
    ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1)
    with st.tap(model, path), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    ds = st.open(path)
    assert not ds.attrs.get("patterns")
    st.verify(ds)


def test_cli_capture_with_patterns_then_verify(tmp_path):
    text = tmp_path / "docs.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\nheads write messages\nshort one\n")
    out = tmp_path / "run.zarr"
    result = invoke("capture", "--model", "tiny:llama", "--text", text, "--out", out, "--batch-size", 2, "--patterns")
    assert result.exit_code == 0, result.output
    ds = st.open(out)
    assert ds.attrs["patterns"] and "rotary_cos" in ds and ds.sizes["token"] == 14
    result = invoke("verify", out)
    assert result.exit_code == 0, result.output
    assert fields(result.stdout)["invariant"] == "ok"
    assert st.verify(ds).attrs["max_output_error"] <= st.tolerance(ds)
    A = st.analysis.attention(ds, 2)
    assert A.query_text.values.tolist() == A.key_text.values.tolist() == ["short", "one"]
    np.testing.assert_allclose(A.values[..., 0, :], [[[1.0, 0.0]] * 4] * 2, rtol=0, atol=0)  # causal
