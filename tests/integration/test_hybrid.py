"""Hybrid models (attention at some depths, state-space / convolution / linear-attention mixers at
the others): every mixer layer is one term, attention layers keep their heads, and the terms add up
to the model's own hidden states (ground truth the tap did not produce)."""

import numpy as np
import pytest
import torch

import streamtap as st
from streamtap.analysis import direct_logit_attribution, residual
from streamtap.errors import StreamtapError

from _util import padded_batch, run

SMALL = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=128,
             num_hidden_layers=4, head_dim=16, max_position_embeddings=64)
HYBRIDS = {   # per type: its config's sizes, layers 1 and 3 attention, 0 and 2 mixers
    "lfm2": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    "bamba": dict(attn_layer_indices=[1, 3], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16,
                  mamba_chunk_size=8),
    "qwen3_next": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                       linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                       layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"]),
}
LENGTHS = [11, 6, 3]


def hybrid_model(model_type: str):
    """A tiny random model of ``model_type`` whose norms are not all ones (a dropped norm would show)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **SMALL, **HYBRIDS[model_type])
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1 and "norm" in name:
                    p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(HYBRIDS))
def captured(request, tmp_path_factory):
    model = hybrid_model(request.param)
    ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1)
    store = tmp_path_factory.mktemp(request.param) / "s.zarr"
    with st.tap(model, store), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return model, st.open(store), out, mask


def test_residual_at_every_depth_matches_the_models_hidden_states(captured):
    model, ds, out, mask = captured
    real = mask.bool()
    for layer in range(model.config.num_hidden_layers):
        truth = out.hidden_states[layer][real].double().numpy()
        ours = residual(ds, layer, dtype=np.float64).values
        assert np.abs(ours - truth).max() <= 1e-5 * np.abs(truth).max(), layer
    final = ds.resid_final.values.astype(np.float64)
    norm = model.base_model.get_submodule(
        {"lfm2": "embedding_norm", "bamba": "final_layernorm", "qwen3_next": "norm"}[model.config.model_type])
    with torch.no_grad():
        normed = norm(torch.from_numpy(final).float()).double().numpy()
    truth = out.hidden_states[-1][real].double().numpy()
    assert np.abs(normed - truth).max() <= 1e-5 * np.abs(truth).max()


def test_mixers_are_one_term_and_attention_keeps_heads(captured):
    model, ds, _, _ = captured
    assert "mixer_out" in ds
    terms = st.decompose(ds, dtype=np.float64)
    labels = set(terms.component.values.tolist())
    assert {"L0_mixer", "L2_mixer"} <= labels and not {"L1_mixer", "L3_mixer"} & labels
    assert {"L1H0", "L3H3"} <= labels and not any(lab.startswith(("L0H", "L2H")) for lab in labels)
    # mixer layers' z and attention layers' mixer_out are stored as zeros
    assert not ds.z.isel(layer=[0, 2]).values.any() and not ds.mixer_out.isel(layer=[1, 3]).values.any()
    assert ds.mixer_out.isel(layer=[0, 2]).values.any()
    resid = ds.resid_final.values.astype(np.float64)
    miss = np.abs(terms.sum("component").values - resid).max() / np.abs(resid).max()
    assert miss <= 1e-5
    assert st.verify(ds).attrs["max_rel_error"] <= 1e-5


def test_dla_sums_to_the_logit(captured):
    model, ds, out, mask = captured
    target = 7
    dla = direct_logit_attribution(ds, target, dtype=np.float64)
    assert "L0_mixer" in dla.component.values
    truth = out.logits[mask.bool()][:, target].double().numpy()
    total = dla.sum("component").values
    assert np.abs(total - truth).max() <= 1e-5 * np.abs(truth).max()


@pytest.mark.parametrize("model_type", sorted(HYBRIDS))
def test_patterns_are_refused_with_the_reason(model_type, tmp_path):
    model = hybrid_model(model_type)
    with pytest.raises(StreamtapError, match="hybrid model"):
        with st.tap(model, tmp_path / "s.zarr", patterns=True):
            run(model, *padded_batch(128, [4]))
    assert not (tmp_path / "s.zarr").exists()
