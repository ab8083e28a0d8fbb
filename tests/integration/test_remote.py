"""The remote path (docs/remote.md): save z, MLP outputs and norm scales inside an nnsight trace, write
the store here. nnsight's remote="local" serializes the trace as for NDIF and runs it in-process."""

import warnings

import numpy as np
import pytest
import torch

import streamtap as st
from streamtap.errors import InferredLayoutWarning
from streamtap.models import tiny_model


def _language_model(arch):
    from nnsight import LanguageModel

    from streamtap.models.tokenizer import word_level_tokenizer

    hf = tiny_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf, LanguageModel(hf, tokenizer=word_level_tokenizer(["a b c"], hf.config.vocab_size))


BATCHES = [
    (torch.tensor([[5, 6, 7, 8, 9], [3, 4, 5, 0, 0]]), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])),
    (torch.tensor([[11, 12, 13]]), torch.tensor([[1, 1, 1]])),
]


@pytest.mark.parametrize("arch,remote,neurons", [("llama", "local", False), ("gemma2", "local", False),
                                                 ("gpt2", False, True)])
def test_a_store_written_from_saved_terms_equals_a_local_tap(arch, remote, neurons, tmp_path):
    hf, model = _language_model(arch)
    plan = st.remote.plan(model, neurons=neurons)
    for i, (ids, mask) in enumerate(BATCHES):
        with model.trace(ids, attention_mask=mask, remote=remote):
            saved = st.remote.save_terms(model, plan)
        if arch == "gemma2":  # the server sent back one scale per token and norm, not the norm's input
            assert saved["norm.0"].shape == ids.shape
        st.remote.write_store(model, saved, tmp_path / "remote.zarr", input_ids=ids, attention_mask=mask,
                              neurons=neurons, append=i > 0)
    with st.tap(hf, tmp_path / "local.zarr", neurons=neurons), torch.no_grad():
        for ids, mask in BATCHES:
            hf(input_ids=ids, attention_mask=mask)
    ours, theirs = st.open(tmp_path / "remote.zarr"), st.open(tmp_path / "local.zarr")
    assert set(ours.variables) == set(theirs.variables)
    for name in theirs.variables:
        np.testing.assert_array_equal(ours[name].values, theirs[name].values, err_msg=name)
    assert ours.attrs["created_by"] == "streamtap.remote.write_store" and ours.attrs["committed_sequences"] == 3
    st.verify(ours)


def test_the_plan_follows_the_forward_and_missing_values_are_named(tmp_path):
    _, model = _language_model("gemma2")
    plan = st.remote.plan(model)
    keys = [e["key"] for e in plan]
    # o_proj runs before the post-attention norm, which runs before the MLP: nnsight needs that order
    assert keys.index("z.0") < keys.index("norm.0") < keys.index("mlp_out.0") < keys.index("z.1")
    assert all(isinstance(e["eps"], float) for e in plan if e["key"].startswith("norm."))
    ids = torch.tensor([[1, 2, 3]])
    with model.trace(ids):
        saved = st.remote.save_terms(model, plan)
    with pytest.raises(st.InputError, match="patterns=True is not available for remote forwards"):
        st.remote.write_store(model, saved, tmp_path / "p.zarr", input_ids=ids, patterns=True)
    assert not (tmp_path / "p.zarr").exists()
    del saved["z.1"]
    with pytest.raises(st.InputError, match=r"saved values lack \['z.1'\]"):
        st.remote.write_store(model, saved, tmp_path / "s.zarr", input_ids=ids)


def test_the_docs_local_example_runs(tmp_path, monkeypatch):
    import pathlib
    import re
    import runpy

    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "remote.md").read_text()
    block = re.findall(r"```python\n(.*?)```", doc, re.S)[-1]  # the "try it here" block
    monkeypatch.chdir(tmp_path)
    (tmp_path / "example.py").write_text(block)  # nnsight reads a trace's source from its file
    runpy.run_path(str(tmp_path / "example.py"), run_name="__main__")
    ds = st.open(tmp_path / "remote_demo.zarr")
    assert ds.sizes["token"] == 6 and ds.attrs["created_by"] == "streamtap.remote.write_store"


def _unknown_type_model():
    """A Llama-shaped model type no family file names (Helium): the remote path must infer and prove it."""
    from nnsight import LanguageModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from streamtap.models.tokenizer import word_level_tokenizer

    config = AutoConfig.for_model("helium", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf, LanguageModel(hf, tokenizer=word_level_tokenizer(["a b c"], 128))


def test_an_inferred_layout_is_proven_here_by_plan_and_the_remote_store_equals_a_local_tap(tmp_path):
    hf, model = _unknown_type_model()
    with pytest.raises(st.UnsupportedArchitectureError, match=r"st.remote.plan\(model\) first"):
        st.remote.write_store(model, {}, tmp_path / "early.zarr", input_ids=BATCHES[0][0])
    with pytest.warns(InferredLayoutWarning, match="verified it exact"):
        plan = st.remote.plan(model)
    ids, mask = BATCHES[0]
    with model.trace(ids, attention_mask=mask, remote="local"):
        saved = st.remote.save_terms(model, plan)
    st.remote.write_store(model, saved, tmp_path / "remote.zarr", input_ids=ids, attention_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with st.tap(hf, tmp_path / "local.zarr"), torch.no_grad():
            hf(input_ids=ids, attention_mask=mask)
    ours, theirs = st.open(tmp_path / "remote.zarr"), st.open(tmp_path / "local.zarr")
    assert ours.attrs["layout_inferred"] is True and ours.attrs["layout"] == "inferred:helium"
    assert set(ours.variables) == set(theirs.variables)
    for name in theirs.variables:
        np.testing.assert_array_equal(ours[name].values, theirs[name].values, err_msg=name)
    st.verify(ours)


def test_an_inferred_layout_is_refused_where_the_weights_are_not_here():
    hf, _ = _unknown_type_model()
    meta = hf.to("meta")
    with pytest.raises(st.UnsupportedArchitectureError, match="meta device"):
        st.remote.plan(meta)
