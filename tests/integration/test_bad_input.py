"""Bad input: a clear error naming the problem and the fix, and never a half-written store."""

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import streamtap as st
from streamtap.models import tiny_model

from _util import padded_batch, run


def test_no_texts_and_empty_texts(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(st.InputError, match="no texts"):
        st.capture(model, [], tmp_path / "a.zarr")
    with pytest.raises(st.InputError, match=r"indices \[1\] are empty"):
        st.capture(model, [[1, 2], [], [3]], tmp_path / "a.zarr")
    assert not os.path.exists(tmp_path / "a.zarr")


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch(shape, tmp_path):
    model = tiny_model("gpt2")
    with st.tap(model, tmp_path / "a.zarr"):
        with pytest.raises(st.InputError, match="empty batch"):
            model(input_ids=torch.zeros(shape, dtype=torch.long))
    assert not os.path.exists(tmp_path / "a.zarr")


def test_row_with_no_real_tokens(tmp_path):
    model = tiny_model("gpt2")
    ids, mask = padded_batch(model.config.vocab_size, [4, 4], seed=0)
    mask[1] = 0
    with st.tap(model, tmp_path / "a.zarr"):
        with pytest.raises(st.InputError, match=r"rows \[1\] have no real tokens"):
            run(model, ids, mask)


def test_sequence_longer_than_positions_errors_or_truncates_when_asked(tmp_path):
    model = tiny_model("gpt2")
    limit = model.config.n_positions
    too_long = [list(range(1, limit + 6))]
    with pytest.raises(st.InputError, match="truncate"):
        st.capture(model, too_long, tmp_path / "a.zarr")
    assert not os.path.exists(tmp_path / "a.zarr")
    with st.tap(model, tmp_path / "b.zarr"):
        with pytest.raises(st.InputError, match=f"exceeds the model's {limit} positions"):
            model(input_ids=torch.ones((1, limit + 1), dtype=torch.long))
    tap = st.capture(model, too_long, tmp_path / "c.zarr", truncate=True)
    assert tap.tokens == limit
    tap = st.capture(model, too_long, tmp_path / "d.zarr", truncate=True, max_length=10)
    assert tap.tokens == 10


def test_architecture_without_layout_lists_supported_ones_and_the_guide(tmp_path):
    class OtherConfig(LlamaConfig):
        model_type = "my-new-arch"

    model = LlamaForCausalLM(OtherConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64)).eval()
    model.model.layers[0].mlp = torch.nn.Identity()  # a block inference cannot read (a Llama would be inferred)
    with pytest.raises(st.UnsupportedArchitectureError) as info:
        st.tap(model, tmp_path / "a.zarr")
    message = str(info.value)
    assert "my-new-arch" in message and "gpt2" in message and "llama" in message
    assert "docs/layouts.md" in message and "could infer a layout from" in message
    assert not os.path.exists(tmp_path / "a.zarr")


def test_model_in_training_mode(tmp_path):
    model = tiny_model("llama").train()
    with pytest.raises(st.StreamtapError, match=r"model.eval\(\)"):
        st.tap(model, tmp_path / "a.zarr")


def test_existing_store_needs_append_or_overwrite(tmp_path):
    model = tiny_model("llama")
    st.capture(model, [[1, 2, 3]], tmp_path / "a.zarr")
    with pytest.raises(st.StoreExistsError, match="append=True.*overwrite=True"):
        st.capture(model, [[4, 5]], tmp_path / "a.zarr")
    assert st.open(tmp_path / "a.zarr").sizes["token"] == 3
    st.capture(model, [[4, 5]], tmp_path / "a.zarr", overwrite=True)
    assert st.open(tmp_path / "a.zarr").sizes["token"] == 2


@pytest.mark.parametrize("change", ["other weights", "other arch", "neurons", "dtype"])
def test_append_refuses_a_different_model_or_schema(change, tmp_path):
    st.capture(tiny_model("llama"), [[1, 2, 3]], tmp_path / "a.zarr")
    other, kw = {
        "other weights": (tiny_model("llama", seed=1), {}),
        "other arch": (tiny_model("gpt2"), {}),
        "neurons": (tiny_model("llama"), {"neurons": True}),
        "dtype": (tiny_model("llama", dtype=torch.bfloat16), {}),
    }[change]
    with pytest.raises(st.StoreMismatchError, match="cannot append"):
        st.capture(other, [[4, 5]], tmp_path / "a.zarr", append=True, **kw)
    ds = st.open(tmp_path / "a.zarr")
    assert ds.sizes["token"] == 3 and ds.attrs["committed_sequences"] == 1


def test_non_finite_activations_are_reported_with_positions_and_nothing_is_written(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    ids, mask = padded_batch(model.config.vocab_size, [5, 3], seed=0)
    with st.tap(model, tmp_path / "a.zarr"):
        with pytest.raises(st.NonFiniteError) as info:
            run(model, ids, mask)
    message = str(info.value)
    assert "row 0 pos 0" in message and "mlp_out" in message and "first at layer 1" in message
    assert not os.path.exists(tmp_path / "a.zarr")


def test_non_finite_batch_after_good_ones_keeps_the_committed_batches(tmp_path):
    model = tiny_model("llama")
    good, mask = padded_batch(model.config.vocab_size, [4, 4], seed=0)
    with st.tap(model, tmp_path / "a.zarr") as tap:
        run(model, good, mask)
        model.model.embed_tokens.weight.data[7] = float("inf")
        bad = good.clone()
        bad[0, 2] = 7
        with pytest.raises(st.NonFiniteError, match="row 0 pos 2"):
            run(model, bad, mask)
    assert tap.tokens == 8
    st.verify(st.open(tmp_path / "a.zarr"))


def test_overwrite_refuses_a_path_that_is_not_a_store(tmp_path):
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "paper.txt").write_text("precious")
    with pytest.raises(st.StoreExistsError, match="not a streamtap store"):
        st.capture(tiny_model("llama"), [[1, 2]], keep, overwrite=True)
    assert (keep / "paper.txt").read_text() == "precious"
