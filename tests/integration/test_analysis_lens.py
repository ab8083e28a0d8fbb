"""Logit lens and what a head says, against the model's own norm and unembedding."""

import numpy as np
import pytest
import torch

import streamtap as st

from _analysis_util import tap_forward


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lens_is_the_models_head_applied_at_each_depth(arch):
    t = tap_forward(arch)
    lens = st.analysis.logit_lens(t.ds, k=4, target=7).compute()
    norm = t.model.base_model.ln_f if arch == "gpt2" else t.model.base_model.norm
    for layer in range(t.ds.sizes["layer"]):
        with torch.no_grad():
            want = t.model.lm_head(norm(torch.from_numpy(t.hidden[layer]).float())).double().numpy()
        top = np.argsort(-want, axis=-1, kind="stable")[:, :4]
        np.testing.assert_array_equal(lens.top_id.isel(depth=layer).values, top)
        np.testing.assert_allclose(lens.target_logit.isel(depth=layer).values, want[:, 7], atol=1e-4)
    final = lens.isel(depth=-1)
    probs = torch.from_numpy(t.logits).softmax(-1).numpy()
    np.testing.assert_array_equal(final.top_id.values[:, 0], t.logits.argmax(-1))
    np.testing.assert_allclose(final.top_prob.values, np.take_along_axis(probs, final.top_id.values, -1), atol=1e-5)
    np.testing.assert_array_equal(final.target_rank.values, (t.logits > t.logits[:, 7:8]).sum(-1))
    assert str(final.depth.values) == "final"


def test_lens_soft_caps_like_the_model():
    t = tap_forward("gemma2")
    final = st.analysis.logit_lens(t.ds, k=3).isel(depth=-1).compute()
    np.testing.assert_allclose(final.top_logit.values[:, 0], t.logits.max(-1), atol=1e-4)
    assert "soft-capped" in final.attrs["note"]


@pytest.mark.parametrize("arch", ["llama", "olmo2"])   # olmo2: messages pass a norm before the stream
def test_head_vocab_is_the_per_vocabulary_attribution_of_each_message(arch):
    t = tap_forward(arch)
    hv = st.analysis.head_vocab(t.ds, k=3).compute()
    assert hv.top_id.dims == ("token", "layer", "head", "k")
    for layer, head in ((0, 1), (1, 3)):
        label = f"L{layer}H{head}"
        for which in ("top", "bottom"):
            ids = hv[f"{which}_id"].sel(layer=layer, head=head).values[:, 0]
            contrib = st.analysis.direct_logit_attribution(t.ds, ids).sel(component=label).values
            np.testing.assert_allclose(hv[f"{which}_logit"].sel(layer=layer, head=head).values[:, 0], contrib,
                                       atol=1e-5)
    assert (hv.top_logit.values[..., 0] >= hv.top_logit.values[..., 1]).all()
    assert (hv.bottom_logit.values[..., 0] <= hv.bottom_logit.values[..., 1]).all()
    sub = st.analysis.head_vocab(t.ds.isel(token=[0, 1]), k=2, layers=[1])
    assert sub.sizes["layer"] == 1 and int(sub.layer.values[0]) == 1
