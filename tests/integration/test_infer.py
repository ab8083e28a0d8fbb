"""Layouts inferred for model types without a family file: used only when the self-check proves them.

The ground truth is the model itself: its ``hidden_states`` (each block's input) and the final norm's
input, read by a hook of this test's own. Tiny models are built from ``AutoConfig.for_model`` with
random weights (biases and norm weights too, so that a dropped one would show).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import zarr

import streamtap as st
import streamtap.layouts as layouts
from streamtap.errors import InferredLayoutWarning, LayoutError, UnsupportedArchitectureError
from streamtap.layouts.infer import candidates
from streamtap.models import tiny_model

from _cli_util import fields, invoke
from _util import padded_batch, run

BOUND = 1e-5   # float32, relative to max |resid| per token
# no family file names these; each is a different shape of block (plain pre-norm, sandwich norms with
# GLM-4's names, post-sublayer norms without input norms, attention biases, a non-gated MLP (Arcee), MLP maps
# held by the block itself with learned (BioGPT) or sinusoidal (XGLM) positions)
INFERRED = ("helium", "glm4", "olmo3", "seed_oss", "arcee", "exaone4", "biogpt", "xglm")
FINAL_NORM = {"biogpt": "biogpt.layer_norm", "xglm": "model.layer_norm"}   # the rest: model.norm


def tiny(model_type: str, seed: int = 0, **overrides):
    """A tiny random causal LM of any transformers model type (2 layers, d_model 64, 4 heads of 16)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields_ = {**dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2, initializer_range=0.2), **overrides}
    config = AutoConfig.for_model(model_type, **fields_)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=g))
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if "norm" in type(module).__name__.lower() and isinstance(weight, torch.nn.Parameter):
                weight.copy_(1.0 + 0.2 * torch.randn(weight.shape, generator=g))
    return model.eval()


def final_norm_input(model, ids, mask):
    """(model output with hidden states, the final norm's input) from a hook of the test's own."""
    seen = {}
    norm = model.get_submodule(FINAL_NORM.get(model.config.model_type, "model.norm"))
    handle = norm.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        handle.remove()
    return out, seen["x"]


def assert_exact(ds, hidden, final, mask):
    real = mask.bool()
    for layer in range(ds.sizes["layer"]):
        entering = hidden[layer][real].double().numpy()
        summed = st.decompose(ds, upto=layer, dtype=np.float64).sum("component").values
        assert (np.abs(summed - entering).max(axis=1) / np.abs(entering).max(axis=1)).max() <= BOUND, layer
    resid = final[real].double().numpy()
    summed = st.decompose(ds, dtype=np.float64).sum("component").values
    assert (np.abs(summed - resid).max(axis=1) / np.abs(resid).max(axis=1)).max() <= BOUND


def assert_logits(ds, model, out, final, mask):
    """The model's own final norm of its final residual, times the stored W_U (which carries any logit
    scale), gives the model's logits: direct logit attribution from the store is exact."""
    real = mask.bool()
    with torch.no_grad():
        normed = model.get_submodule(FINAL_NORM.get(model.config.model_type, "model.norm"))(final[real]).double().numpy()
    ours = normed @ ds["W_U"].values.astype(np.float64).T
    theirs = out.logits[real].double().numpy()
    assert np.abs(ours - theirs).max() <= BOUND * np.abs(theirs).max()


def capture_exact(model, lengths, seed):
    """Tap one padded forward; check it against the model's own hidden states, final residual and
    logits; return the store and the messages of the InferredLayoutWarnings the tap gave."""
    ids, mask = padded_batch(128, lengths, seed=seed)
    store = zarr.storage.MemoryStore()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InferredLayoutWarning)
        tap = st.tap(model, store).__enter__()
    try:
        out, final = final_norm_input(model, ids, mask)
    finally:
        tap.__exit__(None, None, None)
    ds = st.open(store)
    assert_exact(ds, out.hidden_states, final, mask)
    assert_logits(ds, model, out, final, mask)
    return ds, [str(w.message) for w in caught if issubclass(w.category, InferredLayoutWarning)]


@pytest.mark.parametrize("model_type", INFERRED)
def test_an_unknown_model_type_taps_exactly_with_a_proven_inferred_layout(model_type):
    model = tiny(model_type)
    with pytest.raises(UnsupportedArchitectureError):
        layouts.layout_for(model)  # no family file: what follows is inference
    ds, said = capture_exact(model, [9, 5], seed=3)
    assert len(said) == 1 and f"model_type '{model_type}'" in said[0] and "verified it exact" in said[0]
    assert ds.attrs["layout_inferred"] is True and ds.attrs["layout"] == f"inferred:{model_type}"
    assert ds.attrs["layout_declaration"].startswith(f"Layout(name='inferred:{model_type}'")


def test_inferred_multipliers_are_proven_and_stored_in_the_terms(monkeypatch):
    """Granite's embedding, residual and logit multipliers, found by inference alone (its family
    file removed for the test): the stored terms are what the model adds to the stream."""
    monkeypatch.setattr(layouts, "LAYOUTS", [lay for lay in layouts.LAYOUTS if "granite" not in lay.model_types])
    model = tiny_model("granite")
    found = candidates(model)[0]
    assert (found.embed_scale, found.residual_scale) == ("embedding_multiplier", "residual_multiplier")
    ds, said = capture_exact(model, [7, 4], seed=5)
    assert len(said) == 1 and "embed x3, residual x0.5, logit x0.25" in said[0]
    assert ds.attrs["multipliers"] == {"embed": 3.0, "residual": 0.5, "logit": 0.25}


def test_the_self_check_decides_how_a_multiplier_is_applied():
    """HyperCLOVA X multiplies its logits by ``logits_scaling`` where Granite divides by it, and puts
    its sublayer norms under names of its own (post_norm1, post_norm2): inference proposes both
    readings and every pairing of norms, and only the exact one is used."""
    model = tiny("hyperclovax", embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=4.0,
                 attention_multiplier=0.2)
    ds, said = capture_exact(model, [8, 5], seed=7)
    assert len(said) == 1 and "logit x4" in said[0] and "through='post_norm1'" in said[0]
    assert ds.attrs["multipliers"] == {"embed": 2.0, "residual": 0.5, "logit": 4.0}


@pytest.mark.parametrize("arch", ["granite", "cohere", "cohere2", "phi3", "starcoder2"])
def test_family_files_win_over_inference_and_their_logits_come_from_the_stored_weights(arch):
    ds, said = capture_exact(tiny_model(arch), [6, 3], seed=2)
    assert said == [] and ds.attrs["layout"] == arch and "layout_inferred" not in ds.attrs


GRANITE_MULTIPLIERS = dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1,
                          logits_scaling=4.0)


@pytest.mark.parametrize("model_type", ["granitemoe", "granitemoeshared"])
def test_multipliers_on_mixtures_scale_each_expert_and_the_shared_expert_at_capture(model_type):
    """Granite-MoE multiplies the whole mixture write (routed experts plus the block's own shared MLP)
    by residual_multiplier: each stored share is the model's expert output times its router weight
    times the multiplier, the shared term is the model's shared MLP output times it, and together
    they are what the block adds to the stream (the model's own hidden states)."""
    model = tiny(model_type, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=48,
                 **GRANITE_MULTIPLIERS)
    seen = {}
    hooks = [model.get_submodule(f"model.layers.{i}.{name}").register_forward_hook(
        lambda m, a, out, key=(i, name): seen.__setitem__(key, out.detach().clone()))
        for i in range(2) for name in ("block_sparse_moe", "shared_mlp") if model_type == "granitemoeshared"
        or name == "block_sparse_moe"]
    try:
        ds, said = capture_exact(model, [6, 3], seed=4)
    finally:
        for h in hooks:
            h.remove()
    assert said == [] and ds.attrs["layout"] == model_type and ds.attrs["multipliers"]["residual"] == 0.5
    ids, mask = padded_batch(128, [6, 3], seed=4)
    real = mask.bool()
    for layer in range(2):
        experts = ds["expert_out"].values[:, layer].astype(np.float64).sum(axis=1)
        moe = 0.5 * seen[(layer, "block_sparse_moe")][real].double().numpy()
        assert np.abs(experts - moe).max() <= BOUND * np.abs(moe).max()
        write = moe
        if model_type == "granitemoeshared":
            shared = 0.5 * seen[(layer, "shared_mlp")][real].double().numpy()
            stored = ds["shared_expert_out"].values[:, layer].astype(np.float64)
            assert np.abs(stored - shared).max() <= BOUND * np.abs(shared).max()
            write = moe + shared
        mlp = ds["mlp_out"].values[:, layer].astype(np.float64)   # the layer's whole MLP write
        assert np.abs(mlp - write).max() <= BOUND * np.abs(write).max()
    assert st.verify(ds).attrs["max_rel_error"] <= BOUND


def test_minicpm3_mup_scales_are_declared_and_exact():
    """MiniCPM3 scales its embedding by scale_emb (inside the embedding module), every write by
    scale_depth / sqrt(num_hidden_layers) and its logits by dim_model_base / hidden_size; its latent
    attention keeps per-head z and W_O, and refuses patterns as DeepSeek's does."""
    model = tiny("minicpm3", num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                 qk_nope_head_dim=8, v_head_dim=12, scale_emb=12, scale_depth=1.4, dim_model_base=16)
    ds, said = capture_exact(model, [7, 4], seed=6)
    assert said == [] and ds.attrs["layout"] == "minicpm3"
    assert ds.attrs["multipliers"] == pytest.approx({"residual": 1.4 / 2 ** 0.5, "logit": 16 / 64})
    with pytest.raises(st.StreamtapError, match="multi-head latent attention"):
        st.tap(model, zarr.storage.MemoryStore(), patterns=True)


def _unseen_scale(model, layer: int, factor: float = 1.25):
    """A hand-made change inference cannot see: block ``layer`` scales what it adds by ``factor``."""
    block = model.get_submodule(f"model.layers.{layer}")
    original = block.forward

    def forward(hidden_states, *args, **kwargs):
        out = original(hidden_states, *args, **kwargs)
        new = out[0] if isinstance(out, tuple) else out
        new = hidden_states + factor * (new - hidden_states)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    block.forward = forward


def test_a_model_inference_gets_wrong_is_refused_naming_the_block_and_the_error(tmp_path):
    model = tiny("helium", num_hidden_layers=3)
    _unseen_scale(model, 1)
    path = tmp_path / "s.zarr"
    with pytest.raises(UnsupportedArchitectureError) as caught:
        with st.tap(model, path):
            pass
    message = str(caught.value)
    assert "none of the" in message and "model_type 'helium'" in message
    assert "first fails at block 1 (its attention and MLP writes)" in message
    assert "relative error" in message and "docs/layouts.md" in message
    assert "Layout(name='inferred:helium'" in message
    assert "forward" not in model.__dict__  # the tap left the model as it found it


def test_check_false_is_refused_for_an_inferred_layout_and_writes_nothing(tmp_path):
    model = tiny("helium")
    path = tmp_path / "s.zarr"
    with pytest.raises(UnsupportedArchitectureError, match=r"check=False \(--no-check\) is refused.*'helium'"):
        st.tap(model, path, check=False)
    assert not path.exists()
    with st.tap(tiny_model("phi3"), tmp_path / "f.zarr", check=False):  # family files keep check=False
        pass


def test_patterns_are_refused_for_an_inferred_layout_and_where_a_family_cannot_recompute_them(tmp_path):
    """Helium's inferred queries and keys do not give its patterns (the self-check measures how far),
    so patterns are refused when the tap opens, naming the error, and nothing is written."""
    with pytest.raises(st.StreamtapError, match=r"inferred.*do not equal the model's.*smallest error over \d+ "
                                                r"readings [0-9.]+, bound 1e-05"):
        with st.tap(tiny("helium"), tmp_path / "a.zarr", patterns=True):
            pass
    with pytest.raises(st.StreamtapError, match="full-attention layers skip the rotary"):
        st.tap(tiny_model("cohere2", layer_types=["sliding_attention", "full_attention"]), tmp_path / "b.zarr",
               patterns=True)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_streamtap_info_shows_the_inferred_layout(tmp_path):
    path = tmp_path / "s.zarr"
    model = tiny("helium")
    with pytest.warns(InferredLayoutWarning), st.tap(model, path):
        run(model, *padded_batch(128, [5], seed=0))
    result = invoke("info", path)
    assert result.exit_code == 0, result.output
    shown = fields(result.output)
    assert "inferred from the module tree and verified exact at attach time" in shown["layout"]
    assert shown["declaration"].startswith("Layout(name='inferred:helium'")


# -- a model changed after the tap opened ------------------------------------------------------------
def test_a_hook_that_changes_an_output_after_the_tap_opened_is_reported_by_verify():
    model = tiny_model("llama")
    store = zarr.storage.MemoryStore()
    with st.tap(model, store):
        handle = model.model.layers[1].register_forward_hook(lambda module, args, out: (out[0] + 0.5, *out[1:])
                                                             if isinstance(out, tuple) else out + 0.5)
        run(model, *padded_batch(128, [6, 4], seed=0))
    handle.remove()
    with pytest.raises(st.DecompositionError, match="miss the invariant"):
        st.verify(st.open(store))


def test_a_module_swapped_after_the_tap_opened_is_refused_at_the_next_forward():
    model = tiny_model("llama")
    store = zarr.storage.MemoryStore()
    ids, mask = padded_batch(128, [6, 4], seed=0)
    with st.tap(model, store):
        run(model, ids, mask)
        model.model.layers[0].mlp = copy.deepcopy(model.model.layers[0].mlp)
        with pytest.raises(LayoutError, match=r"model\.layers\.0\.mlp was replaced after the tap opened"):
            run(model, ids, mask)
    ds = st.open(store)
    assert ds.sizes["token"] == int(mask.sum())  # the batch before the swap is stored, nothing after it
    st.verify(ds)


@pytest.mark.parametrize("side", ["right", "left"])
def test_the_self_check_probe_is_padded_on_the_tokenizers_side_and_compares_real_tokens(side, monkeypatch):
    """The attach-time probe holds a full row and a shorter one padded where the tokenizer pads; the
    check passes on the model's real tokens there (OPT's positions follow the mask) and fails on a
    layout that misses a term only where a row is padded."""
    from types import SimpleNamespace

    from streamtap.tapping.tap import Tap

    seen = []
    probe = Tap.probe
    monkeypatch.setattr(Tap, "probe", lambda self, ids, entering, mask=None: (
        seen.append(mask.clone()), probe(self, ids, entering, mask))[1])
    tokenizer = SimpleNamespace(padding_side=side)
    with st.tap(tiny_model("opt"), zarr.storage.MemoryStore(), tokenizer=tokenizer):
        pass
    (mask,) = seen
    assert mask.shape[0] == 2 and bool(mask[0].all()) and 0 < int(mask[1].sum()) < mask.shape[1]
    assert bool(mask[1, -1] == 0) if side == "right" else bool(mask[1, 0] == 0)
    # a hook that changes what block 1 adds for the padded row alone: an unpadded probe cannot see it
    model = tiny_model("llama")
    block = model.get_submodule("model.layers.1")

    def padded_row_only(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden.clone()
        if hidden.shape[0] == 2:
            hidden[1] = hidden[1] * 1.5
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
    handle = block.register_forward_hook(padded_row_only)
    try:
        with pytest.raises(st.DecompositionError, match="layer 1"):
            with st.tap(model, zarr.storage.MemoryStore(), tokenizer=tokenizer):
                pass
    finally:
        handle.remove()


@pytest.mark.parametrize("model_type", ["olmo3", "seed_oss", "biogpt", "xglm"])
def test_proven_inferred_queries_and_keys_give_the_models_own_patterns(model_type):
    """Where the self-check proves an inferred attention (rotary, learned and sinusoidal positions),
    patterns=True is served, and the patterns recomputed from the store equal the model's own
    attention probabilities (eager, output_attentions) on a padded batch."""
    from streamtap.attention import sequence_attention

    model = tiny(model_type)
    ids, mask = padded_batch(128, [9, 5], seed=8)
    store = zarr.storage.MemoryStore()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InferredLayoutWarning)
        with st.tap(model, store, patterns=True):
            run(model, ids, mask)
    said = [str(w.message) for w in caught if issubclass(w.category, InferredLayoutWarning)]
    assert len(said) == 1 and "queries and keys proven" in said[0]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    ds = st.open(store)
    assert {"W_Q", "W_K", "W_V"} <= set(ds.data_vars)
    worst = 0.0
    for seq, layer, one in sequence_attention(ds):
        n = int(mask[seq].sum())
        theirs = out.attentions[layer][seq, one.heads][:, :n, :n].double().numpy()
        worst = max(worst, float(np.abs(one.pattern - theirs).max()))
    assert worst <= BOUND


def test_unproven_inferred_queries_and_keys_are_not_stored_and_analyses_say_so():
    """Helium's inferred attention is not proven: the store has no W_Q/W_K/W_V for an analysis to read
    silently, and one that needs them says what is missing."""
    from streamtap.analysis._store import MissingWeightsError

    ds, said = capture_exact(tiny("helium"), [6, 4], seed=9)
    assert "W_Q, W_K and W_V not stored" in said[0]
    assert not {"W_Q", "W_K", "W_V"} & set(ds.data_vars)
    with pytest.raises(MissingWeightsError, match="W_Q"):
        st.analysis.qk_matrix(ds)
