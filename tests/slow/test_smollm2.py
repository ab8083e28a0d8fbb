"""The real pretrained model (SmolLM2-135M-Instruct, Llama architecture, tied embeddings): the invariant,
attribution, the command line's demo and generation."""

import re

import numpy as np
import pytest
import torch
import zarr

import streamtap as st
from streamtap.models import load_model

from _cli_util import fields, invoke
from _generation_util import assert_same_terms, by_sequence, expected, plain_forward_store

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
    summed = (ds.head_output.sel(layer=17).sum("head") + ds.attn_bias.sel(layer=17)).values
    expected = captured["attn"][0].numpy()
    assert np.abs(summed - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_self_check_passes_in_half_precision(dtype):
    """Rounding grows with depth and the residual can shrink by cancellation: 30 layers must pass."""
    from streamtap.tapping.self_check import self_check

    model, _ = load_model("smollm2", dtype=dtype)
    with st.tap(model, zarr.storage.MemoryStore(), check=False) as the_tap:
        assert self_check(the_tap) <= st.tolerance(dtype, n_layers=30)


# -- the command line's demo (from tests/test_cli.py) -------------------------------------------------
def _smollm2_or_skip():
    models = pytest.importorskip("streamtap.models")
    try:
        return models.load_model(models.DEFAULT_MODEL)
    except Exception as exc:  # no gguf package or wheel here: the tiny-model tests still cover the CLI
        pytest.skip(f"the default model cannot be loaded here: {exc}")


def test_demo_on_smollm2_finds_paris(tmp_path):
    _smollm2_or_skip()  # converts and caches it once, so the demo below times the capture alone
    result = invoke("demo", "--out", tmp_path / "demo.zarr")
    assert result.exit_code == 0, result.output
    got = fields(result.stdout)
    assert got["top-1 next token"].startswith('" Paris"')
    assert 0.7 < float(got["top-1 next token"].split("p = ")[1]) < 0.85
    logit = re.search(r"model (-?[\d.]+), sum of \d+ direct contributions (-?[\d.]+)", got['" Paris" logit'])
    model_logit, total = float(logit.group(1)), float(logit.group(2))
    assert abs(model_logit - total) <= 1e-3 and got['" Paris" logit'].endswith("ok")
    assert "ok" in got["max decomposition error"]


# -- generation (from tests/test_generation.py) -----------------------------------------------------
def test_smollm2_generation_float32(tmp_path):
    model, tok = st.models.load_model("smollm2", dtype="float32")
    tok.padding_side = "left"
    prompts = ["The capital of France is", "Water boils at a temperature of"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with st.tap(model, tmp_path / "gen.zarr", tokenizer=tok) as tap:
        out = model.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert " Paris" in tok.decode(out[0, batch["input_ids"].shape[1]:])
    ds = st.open(tmp_path / "gen.zarr")
    want = expected(batch["input_ids"], batch["attention_mask"], out, eos=tok.eos_token_id)
    assert by_sequence(ds) == dict(enumerate(want)) and tap.tokens == sum(map(len, want))
    ordered = ds.sortby(["seq", "pos"])
    first = ordered.isel(token=ordered.seq.values == 0)
    assert "".join(map(str, first.text.values)).startswith(prompts[0] + " Paris")
    assert st.verify(ds).attrs["max_rel_error"] <= 1e-5
    assert_same_terms(ds, plain_forward_store(model, out, batch["attention_mask"], tmp_path / "plain.zarr"))
