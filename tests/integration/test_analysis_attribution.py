"""Direct logit attribution: the contributions plus the biases are the model's own logits."""

import numpy as np
import pytest
import xarray as xr

import streamtap as st
from streamtap.analysis import MissingWeightsError

from _analysis_util import tap_forward

# pre-norm (the fast path, folded into W_O), post-sublayer norms and experts (through decompose)
ARCHS = ["gpt2", "llama", "qwen2", "gemma2", "olmo2", "mixtral"]


@pytest.fixture(scope="module", params=ARCHS)
def tapped(request):
    return tap_forward(request.param)


def _precap(t, logits):
    cap = t.model.config.to_dict().get("final_logit_softcapping")
    return cap * np.arctanh(logits / cap) if cap else logits


def test_contributions_sum_to_the_models_logit(tapped):
    logits = _precap(tapped, tapped.logits)
    contrib = st.analysis.direct_logit_attribution(tapped.ds, 5, dtype=np.float64).compute()
    assert contrib.dims == ("component", "token")
    assert contrib.sizes["token"] == logits.shape[0]
    np.testing.assert_allclose(contrib.sum("component").values, logits[:, 5], rtol=0, atol=2e-5 * np.abs(logits).max())
    labels = list(contrib.component.values)
    assert labels[0] == "embed" and "L1H3" in labels


def test_logit_difference_and_per_token_targets(tapped):
    logits = _precap(tapped, tapped.logits)
    tol = 2e-5 * np.abs(logits).max()
    diff = st.analysis.direct_logit_attribution(tapped.ds, 5, foil=9).compute()
    np.testing.assert_allclose(diff.sum("component").values, logits[:, 5] - logits[:, 9], atol=tol)
    # each token's own next-token id as target, a fixed foil
    targets = np.asarray(tapped.ds.token_id.values)[::-1].copy()
    per = st.analysis.direct_logit_attribution(tapped.ds, targets, foil=3).compute()
    rows = np.arange(len(targets))
    np.testing.assert_allclose(per.sum("component").values, logits[rows, targets] - logits[:, 3], atol=tol)
    assert per.attrs["target"] == "per token"


@pytest.mark.parametrize("arch", ["gpt2", "gemma2", "bloom-post-ln-residual", "mixtral"])
def test_each_component_equals_its_decomposed_term_read_through_the_final_norm(arch):
    # independent of the attribution's backward walk: decompose's terms, each dotted with the folded
    # direction gamma * (W_U[7] - W_U[2]) (centred for a LayerNorm) and scaled by the final norm's s
    t = tap_forward(arch)
    ds = t.ds
    contrib = st.analysis.direct_logit_attribution(ds, 7, foil=2, dtype=np.float64).compute()
    terms = st.decompose(ds, dtype=np.float64).compute()
    gamma = ds["final_norm_weight"].values.astype(np.float64)
    w = gamma * (ds["W_U"].values[7] - ds["W_U"].values[2]).astype(np.float64)
    resid = ds["resid_final"].values.astype(np.float64)
    layernorm = ds.attrs["final_norm_kind"] == "layernorm"
    if layernorm:
        w = w - w.mean()
        resid = resid - resid.mean(-1, keepdims=True)
    s = 1 / np.sqrt((resid ** 2).mean(-1) + ds.attrs["final_norm_eps"])
    expected = (terms.values @ w) * s
    n = terms.sizes["component"]
    assert list(contrib.component.values[:n]) == list(terms.component.values)
    np.testing.assert_allclose(contrib.values[:n], expected, atol=1e-6 * np.abs(expected).max())
    logits = t.logits
    cap = getattr(t.model.config, "final_logit_softcapping", None)
    if cap:  # the model reports cap * tanh(logit / cap); the attribution is of the logit it caps
        logits = cap * np.arctanh(logits / cap)
    logit_diff = logits[:, 7] - logits[:, 2]
    np.testing.assert_allclose(contrib.sum("component").values, logit_diff, atol=2e-5 * np.abs(logits).max())


def test_neurons_and_a_single_token():
    t = tap_forward("llama", neurons=True)
    contrib = st.analysis.direct_logit_attribution(t.ds, 11, neurons=True).compute()
    assert "L1N5" in contrib.component.values and "L1_mlp_bias" in contrib.component.values
    np.testing.assert_allclose(contrib.sum("component").values, t.logits[:, 11], atol=2e-5 * np.abs(t.logits).max())
    one = st.analysis.direct_logit_attribution(t.ds.isel(token=4), 11)
    assert one.dims == ("component",)
    assert abs(float(one.sum()) - t.logits[4, 11]) < 2e-5 * np.abs(t.logits).max()


def test_unembedding_bias_is_a_component_and_missing_unembedding_is_named():
    t = tap_forward("llama")
    bias = np.linspace(-1, 1, t.ds.sizes["vocab"]).astype(np.float32)
    ds = t.ds.assign(unembed_bias=xr.DataArray(bias, dims=("vocab",)))
    contrib = st.analysis.direct_logit_attribution(ds, 17).compute()
    assert contrib.component.values[-1] == "unembed_bias"
    np.testing.assert_allclose(contrib.sum("component").values, t.logits[:, 17] + bias[17], atol=1e-4)
    with pytest.raises(MissingWeightsError, match="W_U"):
        st.analysis.direct_logit_attribution(t.ds.drop_vars("W_U"), 17)


def test_result_is_lazy_and_chunked_like_the_store(tmp_path):
    t = tap_forward("gpt2", store=str(tmp_path / "s.zarr"), chunks={"token": 4})
    contrib = st.analysis.direct_logit_attribution(t.ds, 5)
    assert contrib.chunks[1] == t.ds["resid_final"].data.chunks[0] and len(contrib.chunks[1]) > 1
    np.testing.assert_allclose(contrib.sum("component").values, t.logits[:, 5], atol=2e-5 * np.abs(t.logits).max())
