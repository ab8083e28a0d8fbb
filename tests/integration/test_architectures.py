"""Beyond the invariant: depth decompositions, the attach-time self-check, and what a term means."""

import numpy as np
import pytest
import torch
import zarr

import streamtap as st
from streamtap.models import TINY_ARCHS, tiny_model

from _util import padded_batch, run


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_residual_entering_every_layer_is_the_sum_of_the_terms_before_it(arch):
    model = tiny_model(arch)
    ids, mask = padded_batch(model.config.vocab_size, [9, 5], seed=3)
    store = zarr.storage.MemoryStore()
    with st.tap(model, store), torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    ds = st.open(store)
    real = mask.bool()
    for layer in range(ds.sizes["layer"]):
        entering = hidden[layer][real].double().numpy()
        summed = st.decompose(ds, upto=layer, dtype=np.float64).sum("component").values
        scale = np.abs(entering).max(axis=1, keepdims=True)
        assert (np.abs(summed - entering) / scale).max() <= 1e-5, f"layer {layer}"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "gemma2"])
def test_residual_entering_an_mlp(arch):
    model = tiny_model(arch)
    ids, mask = padded_batch(model.config.vocab_size, [7], seed=4)
    store = zarr.storage.MemoryStore()
    with st.tap(model, store):
        run(model, ids, mask)
    ds = st.open(store)
    terms = st.decompose(ds, upto=(1, "mlp"))
    assert "L1H0" in terms.component.values and "L1_mlp" not in terms.component.values
    assert "L0_mlp" in terms.component.values
    with pytest.raises(st.StreamtapError, match="no attn at layer 9"):
        st.decompose(ds, upto=9)


def _add_an_unknown_term(model, layer: int, block_path: str):
    """A model revision the layout does not know: block ``layer`` adds a constant to the stream."""
    block = model.get_submodule(f"{block_path}.{layer}")
    original = block.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] + 0.5, *out[1:])
        return out + 0.5

    block.forward = forward


@pytest.mark.parametrize("arch, blocks", [("llama", "model.layers"), ("gpt2", "transformer.h")])
def test_self_check_names_the_layer_that_does_not_add_up(arch, blocks, tmp_path):
    model = tiny_model(arch)
    _add_an_unknown_term(model, 1, blocks)
    with pytest.raises(st.DecompositionError, match="up to layer 1 do not add up to the final residual|layer 1"):
        with st.tap(model, tmp_path / "s.zarr"):
            pass
    assert "forward" in model.get_submodule(f"{blocks}.1").__dict__  # the user's own patch stays
    assert "forward" not in model.__dict__                          # the tap's is gone
    with st.tap(model, tmp_path / "s.zarr", check=False):            # opting out still captures
        run(model, *padded_batch(model.config.vocab_size, [4], seed=0))
    with pytest.raises(st.DecompositionError):
        st.verify(st.open(tmp_path / "s.zarr"))


def test_self_check_names_a_middle_layer():
    model = tiny_model("llama", num_hidden_layers=4)
    _add_an_unknown_term(model, 1, "model.layers")
    with pytest.raises(st.DecompositionError, match="up to layer 1 do not add up to the residual entering layer 2"):
        st.tap(model, zarr.storage.MemoryStore()).__enter__()


@pytest.mark.parametrize("arch", ["gemma2", "olmo2"])
def test_post_sublayer_norm_heads_arrive_through_the_norm(arch):
    """A head's component is what it adds to the stream: the message through the frozen post-norm."""
    model = tiny_model(arch)
    ids, mask = padded_batch(model.config.vocab_size, [8], seed=5)
    captured = {}

    def keep(module, args, output):
        captured["post"] = output.detach()

    hook = model.model.layers[1].post_attention_layernorm.register_forward_hook(keep)
    store = zarr.storage.MemoryStore()
    with st.tap(model, store):
        run(model, ids, mask)
    hook.remove()
    terms = st.decompose(st.open(store), dtype=np.float64)
    attn = terms.where((terms.layer == 1) & terms.kind.isin(["head", "attn_bias", "norm_beta"]), drop=True)
    arrived = attn.sum("component").values
    np.testing.assert_allclose(arrived, captured["post"][0].double().numpy(), rtol=1e-5, atol=1e-6)
    raw = st.open(store).head_output.sel(layer=1).sum("head").values
    assert np.abs(raw - captured["post"][0].numpy()).max() > 0.1  # raw messages are not what arrives


@pytest.mark.parametrize("arch", ["bert", "opt-post-ln"])
def test_post_ln_betas_are_terms_and_every_term_passes_later_norms(arch):
    model = tiny_model(arch)
    ids, mask = padded_batch(model.config.vocab_size, [6, 4], seed=6)
    store = zarr.storage.MemoryStore()
    with st.tap(model, store):
        run(model, ids, mask)
    ds = st.open(store)
    terms = st.decompose(ds)
    kinds = set(terms.kind.values)
    assert "norm_beta" in kinds and ds.sizes["norm"] == (2 * 2 + (1 if arch == "bert" else 0))
    assert ds.norm_scale.dims == ("token", "norm")
    st.verify(ds)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_layer_splits_into_one_term_per_routed_expert(arch):
    model = tiny_model(arch)
    ids, mask = padded_batch(model.config.vocab_size, [7, 4], seed=7)
    routed = {}

    def keep(module, args, output):
        routed["index"] = output[2].detach()  # (tokens, top_k) from the router

    hook = model.model.layers[1].mlp.gate.register_forward_hook(keep)
    store = zarr.storage.MemoryStore()
    with st.tap(model, store):
        run(model, ids, mask)
    hook.remove()
    ds = st.open(store)
    terms = st.decompose(ds, dtype=np.float64)
    experts = terms.where((terms.layer == 1) & terms.kind.isin(["expert", "shared_expert"]), drop=True)
    mlp = ds.mlp_out.sel(layer=1).values
    assert np.abs(experts.sum("component").values - mlp).max() <= 1e-5 * np.abs(mlp).max()
    chosen = routed["index"][mask.reshape(-1).bool()].numpy()
    per_expert = terms.where((terms.layer == 1) & (terms.kind == "expert"), drop=True)
    written = np.abs(per_expert.values).max(axis=2) > 0            # (expert, token)
    for token in range(ds.sizes["token"]):
        assert set(np.flatnonzero(written[:, token])) == set(chosen[token])
    assert ("L1_shared_expert" in terms.component.values) == (arch == "qwen2_moe")
    with pytest.raises(st.StreamtapError, match="mixture-of-experts"):
        st.tap(model, zarr.storage.MemoryStore(), neurons=True)
