"""The tap leaves the model as it was, works on envoys, and its appends round-trip."""

import nnsight
import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import streamtap as st
from streamtap.models import tiny_model

from _util import padded_batch, run


def _module_state(model):
    return [(name, sorted(m.__dict__), len(m._forward_hooks), len(m._forward_pre_hooks),
             len(m._forward_hooks_with_kwargs))
            for name, m in model.named_modules()]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logits_bit_identical_and_nothing_left_attached(arch, tmp_path):
    model = tiny_model(arch)
    ids, mask = padded_batch(model.config.vocab_size, [9, 4], seed=2)
    before_state = _module_state(model)
    before_impl = model.config._attn_implementation
    params = {k: v.clone() for k, v in model.state_dict().items()}
    plain = run(model, ids, mask).logits
    with st.tap(model, tmp_path / "s.zarr"):
        tapped = run(model, ids, mask).logits
    after = run(model, ids, mask).logits
    assert torch.equal(plain, tapped) and torch.equal(plain, after)
    assert _module_state(model) == before_state
    assert "forward" not in model.__dict__
    assert model.config._attn_implementation == before_impl
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert not torch.nn.modules.module._global_forward_hooks


def test_tap_accepts_an_nnsight_envoy_and_leaves_it_usable(tmp_path):
    model = tiny_model("llama")
    envoy = nnsight.NNsight(model)
    ids, mask = padded_batch(model.config.vocab_size, [7, 5], seed=4)
    with st.tap(envoy, tmp_path / "s.zarr") as tap:
        run(model, ids, mask)
    assert tap.tokens == 12
    st.verify(st.open(tmp_path / "s.zarr"))
    with torch.no_grad(), envoy.trace(input_ids=ids, attention_mask=mask):
        hidden = envoy.model.norm.input.save()
    np.testing.assert_allclose(st.open(tmp_path / "s.zarr").resid_final.values[:7], hidden[0, :7].numpy(), rtol=1e-6, atol=1e-6)


def test_error_inside_the_block_restores_the_model_and_keeps_committed_batches(tmp_path):
    model = tiny_model("gpt2")
    ids, mask = padded_batch(model.config.vocab_size, [6, 6], seed=5)
    with pytest.raises(RuntimeError, match="user code"):
        with st.tap(model, tmp_path / "s.zarr"):
            run(model, ids, mask)
            raise RuntimeError("user code failed")
    assert "forward" not in model.__dict__
    assert st.open(tmp_path / "s.zarr").sizes["token"] == 12


def test_two_appends_equal_one_shot_capture(tmp_path):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [8, 5, 7, 2], seed=6)
    with st.tap(model, tmp_path / "one.zarr", neurons=True):
        run(model, ids, mask)
    with st.tap(model, tmp_path / "two.zarr", neurons=True):
        run(model, ids[:2], mask[:2])
    with st.tap(model, tmp_path / "two.zarr", neurons=True, append=True) as second:
        run(model, ids[2:], mask[2:])
    assert (second.tokens, second.sequences, second.store_tokens) == (9, 2, 22)
    one, two = st.open(tmp_path / "one.zarr"), st.open(tmp_path / "two.zarr")
    assert two.attrs["committed_sequences"] == 4
    for name in ("embed", "z", "mlp_out", "neuron_act", "resid_final", "seq", "pos", "token_id", "W_O", "W_out"):
        np.testing.assert_allclose(one[name].values, two[name].values, rtol=1e-6, atol=1e-6, err_msg=name)
    assert list(two.seq.values) == [0] * 8 + [1] * 5 + [2] * 7 + [3] * 2
    plain = xr.open_zarr(tmp_path / "two.zarr", consolidated=False)
    assert plain.sizes["token"] == 22
    np.testing.assert_array_equal(plain.z.values, two.z.values)


def test_messages_are_per_head_z_times_W_O(tmp_path):
    model = tiny_model("gpt2")
    ids, mask = padded_batch(model.config.vocab_size, [5], seed=7)
    with st.tap(model, tmp_path / "s.zarr"):
        run(model, ids, mask)
    ds = st.open(tmp_path / "s.zarr")
    assert ds.head_output.dims == ("token", "layer", "head", "d_model")
    attn = model.transformer.h[1].attn
    captured = {}

    def keep(module, args, output):
        captured["out"] = output[0].detach()

    h = attn.register_forward_hook(keep)
    run(model, ids, mask)
    h.remove()
    total = ds.head_output.sel(layer=1).sum("head") + ds.attn_bias.sel(layer=1)
    np.testing.assert_allclose(total.values, captured["out"][0].numpy(), rtol=1e-5, atol=1e-6)


def test_capture_into_a_memory_store_and_from_token_id_lists():
    model = tiny_model("qwen2")
    store = zarr.storage.MemoryStore()
    tap = st.capture(model, [[1, 2, 3, 4], [5, 6], [7, 8, 9]], store, batch_size=2)
    assert (tap.tokens, tap.sequences) == (9, 3)
    ds = st.open(store)
    assert list(ds.token_id.values) == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert list(ds.pos.values) == [0, 1, 2, 3, 0, 1, 0, 1, 2]
    st.verify(ds)


def test_neuron_decomposition_is_lazy_and_exact(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=512)).eval()
    ids, mask = padded_batch(512, [24, 16], seed=8)
    with st.tap(model, tmp_path / "s.zarr", neurons=True):
        run(model, ids, mask)
    ds = st.open(tmp_path / "s.zarr")
    terms = st.decompose(ds, neurons=True)
    assert terms.sizes["component"] == 1 + 1 + 12 * (12 + 1 + 3072 + 1)
    full = terms.size * 4
    biggest = max(terms.data.chunks[0]) * max(terms.data.chunks[1]) * max(terms.data.chunks[2]) * 4
    assert full > 1.4e9 and biggest < 80e6  # never one block of tokens x all neurons x d_model
    miss = abs(terms.sum("component") - ds.resid_final).max().compute()
    assert float(miss) <= 1e-5 * float(abs(ds.resid_final).max())
    labels = terms.component.values
    assert "L3N1234" in labels and "L11_mlp_bias" in labels


def test_verify_fails_on_damaged_or_nan_data(tmp_path):
    model = tiny_model("llama")
    st.capture(model, [[1, 2, 3, 4], [5, 6, 7]], tmp_path / "s.zarr")
    group = zarr.open_group(tmp_path / "s.zarr", mode="r+")
    group["mlp_out"][1:2] = 0.0
    group["mlp_out"][5:6] = np.nan
    with pytest.raises(st.DecompositionError, match="2 of 7 tokens"):
        st.verify(st.open(tmp_path / "s.zarr"))
    err = st.verify(st.open(tmp_path / "s.zarr"), raise_on_error=False)
    assert np.isnan(err.attrs["max_rel_error"])


def test_open_names_the_problem_for_a_path_that_is_no_store(tmp_path):
    model = tiny_model("llama")
    st.capture(model, [[1, 2, 3]], tmp_path / "s.zarr")
    with pytest.raises(st.StreamtapError, match="top directory"):
        st.open(tmp_path / "s.zarr" / "mlp_out")
    with pytest.raises(st.StreamtapError, match="no streamtap store"):
        st.open(tmp_path / "missing.zarr")
