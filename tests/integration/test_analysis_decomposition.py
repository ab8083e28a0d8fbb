"""Decomposition at any depth: the residual entering each layer's attention and MLP, against the model."""

import pytest

import streamtap as st

from _analysis_util import close, sublayer_inputs, tap_forward

MLP_NORM = {"gpt2": "ln_2", "llama": "post_attention_layernorm"}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_residual_entering_attention_and_mlp_is_the_models(arch):
    t = tap_forward(arch)
    n_layers = t.ds.sizes["layer"]
    mids = sublayer_inputs(t.model, t.ids, t.mask, MLP_NORM[arch])
    stream = st.analysis.residual_stream(t.ds, sites=("attn", "mlp")).compute()
    assert list(stream.depth.values) == ["L0_attn_in", "L0_mlp_in", "L1_attn_in", "L1_mlp_in", "final"]
    for layer in range(n_layers):
        assert close(stream.sel(depth=f"L{layer}_attn_in").values, t.hidden[layer])
        assert close(stream.sel(depth=f"L{layer}_mlp_in").values, mids[layer])
        for site, want in (("attn", t.hidden[layer]), ("mlp", mids[layer])):
            terms = st.analysis.residual_terms(t.ds, layer, site)
            assert close(terms.sum("component").values, want)
            assert close(st.analysis.residual(t.ds, layer, site).values, want)
            written = terms.layer.values
            assert (written < layer + (site == "mlp")).all()
    final = st.analysis.residual_terms(t.ds, n_layers)
    assert close(final.sum("component").values, t.ds.resid_final.values)


def test_post_sublayer_norm_model_goes_through_decompose():
    t = tap_forward("olmo2")          # norms on each sublayer's output: the fast path does not apply
    for layer in range(t.ds.sizes["layer"]):
        assert close(st.analysis.residual(t.ds, layer).values, t.hidden[layer])
    stream = st.analysis.residual_stream(t.ds).compute()
    assert close(stream.isel(depth=1).values, t.hidden[1])


def test_single_token_and_bad_site():
    t = tap_forward("llama")
    one = st.analysis.residual_terms(t.ds.isel(token=2), 1, "mlp")
    assert one.dims == ("component", "d_model")
    with pytest.raises(ValueError, match="site"):
        st.analysis.residual_terms(t.ds, 1, "ffn")
    with pytest.raises(ValueError, match="layer"):
        st.analysis.residual(t.ds, 5)
