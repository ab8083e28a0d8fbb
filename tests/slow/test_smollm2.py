"""The real pretrained model (SmolLM2-135M-Instruct, Llama architecture, tied embeddings)."""

import numpy as np
import pytest
import torch
import zarr

import streamtap as st
from streamtap.models import load_model

PROMPTS = ["The capital of France is", "Water boils at a temperature of one hundred degrees"]


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2", dtype="float32")


@pytest.fixture(scope="module")
def store(smollm2, tmp_path_factory):
    model, tok = smollm2
    path = tmp_path_factory.mktemp("smol") / "run.zarr"
    st.capture(model, PROMPTS, path, tokenizer=tok, batch_size=2)
    return path


def test_float32_terms_sum_to_residual(store):
    ds = st.open(store)
    assert ds.attrs["layout"] == "llama" and ds.attrs["tied_embeddings"]
    err = st.verify(ds)
    assert err.attrs["max_rel_error"] <= 1e-5


def test_token_text_is_stored(smollm2, store):
    _, tok = smollm2
    ds = st.open(store)
    first = ds.isel(token=ds.seq.values == 0)
    assert "".join(str(t) for t in first.text.values) == PROMPTS[0]
    assert list(first.token_id.values) == tok(PROMPTS[0])["input_ids"]


def test_paris_is_top1_and_attribution_sums_to_the_logit(smollm2, store):
    model, tok = smollm2
    enc = tok(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, -1]
    paris = tok(" Paris", add_special_tokens=False)["input_ids"][0]
    prob = logits.softmax(-1)
    assert int(prob.argmax()) == paris and 0.7 < float(prob[paris]) < 0.85
    ds = st.open(store)
    last = int(np.flatnonzero(ds.seq.values == 0)[-1])
    contrib = st.analysis.direct_logit_attribution(ds.isel(token=last), paris)
    assert abs(float(contrib.sum("component")) - float(logits[paris])) <= 1e-4 * abs(float(logits[paris])) + 1e-4


def test_heads_plus_bias_equal_the_attention_output(smollm2, tmp_path):
    model, tok = smollm2
    captured = {}

    def keep(module, args, output):
        captured["attn"] = output[0].detach()

    hook = model.model.layers[17].self_attn.register_forward_hook(keep)
    enc = tok(PROMPTS[1], return_tensors="pt")
    with st.tap(model, tmp_path / "s.zarr"), torch.no_grad():
        model(**enc)
    hook.remove()
    ds = st.open(tmp_path / "s.zarr")
    summed = (ds.messages.sel(layer=17).sum("head") + ds.attn_bias.sel(layer=17)).values
    expected = captured["attn"][0].numpy()
    assert np.abs(summed - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_self_check_passes_in_half_precision(dtype):
    """Rounding grows with depth and the residual can shrink by cancellation: 30 layers must pass."""
    from streamtap.tapping.self_check import self_check

    model, _ = load_model("smollm2", dtype=dtype)
    with st.tap(model, zarr.storage.MemoryStore(), check=False) as the_tap:
        assert self_check(the_tap) <= st.tolerance(dtype, n_layers=30)
