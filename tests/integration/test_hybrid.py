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
    # dense MLPs at layers 0 and 2, experts at 1 and 3
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, num_experts=4,
                  num_experts_per_tok=2, mamba_d_state=8),
    # Granite-4 without experts, its multipliers away from 1 (a multiplier left out of a term would show)
    "granitemoehybrid": dict(layer_types=["mamba", "attention", "mamba", "attention"], num_local_experts=0,
                             mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=8,
                             shared_intermediate_size=32, embedding_multiplier=3.0, residual_multiplier=0.6,
                             logits_scaling=2.0, attention_multiplier=0.3),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"], num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=32, num_dense_layers=1),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], lru_width=64, attention_window_size=8),
    # Qwen3.5 (dense MLP), OLMo-Hybrid (OLMo-2 attention layers), MiniMax (alpha x each norm's output + beta x the
    # write, away from 1 so a factor left out would show)
    "qwen3_5_text": dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                         linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"] * 2),
    "olmo_hybrid": dict(pad_token_id=0, linear_num_value_heads=4, linear_num_key_heads=4, linear_key_head_dim=16,
                        linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"] * 2),
    "minimax": dict(num_local_experts=4, num_experts_per_tok=2, block_size=4, full_attn_alpha_factor=3.5,
                    linear_attn_alpha_factor=2.0, mlp_alpha_factor=3.0, full_attn_beta_factor=0.5,
                    linear_attn_beta_factor=0.7, layer_types=["linear_attention", "full_attention"] * 2),
}
MAMBA2 = dict(n_groups=1, chunk_size=8)
ONE_SUBLAYER = {   # blocks of one sublayer each: pure state-space models, and Nemotron-H (mamba, moe, attention, mlp)
    "mamba": dict(state_size=8),
    "falcon_mamba": dict(state_size=8),
    "mamba2": dict(num_heads=8, state_size=16, **MAMBA2),   # head_dim 16 from SMALL
    "nemotron_h": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mamba_num_heads=8,
                       moe_shared_expert_intermediate_size=32, mamba_head_dim=16, ssm_state_size=16, **MAMBA2),
}
FALCON_H1 = dict(   # every muP multiplier away from 1, so a multiplier left out of a term shows
    mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_chunk_size=8,
    embedding_multiplier=3.0, lm_head_multiplier=0.5, attention_out_multiplier=0.7, ssm_out_multiplier=1.7,
    attention_in_multiplier=1.3, key_multiplier=0.8, ssm_in_multiplier=1.2, mlp_multipliers=[0.9, 1.4],
    ssm_multipliers=[1.1, 0.9, 1.2, 0.8, 1.05])
HOOKED = {**ONE_SUBLAYER, "falcon_h1": FALCON_H1}   # checked against each block's input, by the test's own hooks
LENGTHS = [11, 6, 3]


def hybrid_model(model_type: str):
    """A tiny random model of ``model_type`` whose norms are not all ones (a dropped norm would show)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **SMALL, **{**HYBRIDS, **HOOKED}[model_type])
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
        {"lfm2": "embedding_norm", "bamba": "final_layernorm", "qwen3_next": "norm",
         "jamba": "final_layernorm", "granitemoehybrid": "norm", "lfm2_moe": "embedding_norm",
         "recurrent_gemma": "final_norm", "qwen3_5_text": "norm", "olmo_hybrid": "norm",
         "minimax": "norm"}[model.config.model_type])
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
    cap = ds.attrs.get("final_logit_softcap")   # RecurrentGemma: DLA is of the logit before its soft-cap
    truth = cap * np.arctanh(truth / cap) if cap else truth
    total = dla.sum("component").values
    assert np.abs(total - truth).max() <= 1e-5 * np.abs(truth).max()


@pytest.mark.parametrize("model_type", sorted(HYBRIDS) + sorted(HOOKED))
def test_patterns_are_refused_with_the_reason(model_type, tmp_path):
    model = hybrid_model(model_type)
    reason = ("every layer is a state-space mixer" if "mamba" in model_type else
              "attention_in_multiplier" if model_type == "falcon_h1" else "hybrid model")
    with pytest.raises(StreamtapError, match=reason):
        with st.tap(model, tmp_path / "s.zarr", patterns=True):
            run(model, *padded_batch(128, [4]))
    assert not (tmp_path / "s.zarr").exists()


@pytest.fixture(scope="module", params=sorted(HOOKED))
def one_sublayer(request, tmp_path_factory):
    """A capture with the input of every block recorded by the test's own hooks (Mamba's hidden_states
    leave out the embeddings, so the hooks are the ground truth all of them share)."""
    model = hybrid_model(request.param)
    ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1)
    store = tmp_path_factory.mktemp(request.param) / "s.zarr"
    seen = {}

    def record(layer):
        def hook(module, args, kwargs):
            seen[layer] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    hooks = [block.register_forward_pre_hook(record(i), with_kwargs=True)
             for i, block in enumerate(model.base_model.layers)]
    with st.tap(model, store), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    return model, st.open(store), out, mask, seen


def test_one_sublayer_blocks_match_each_blocks_input(one_sublayer):
    model, ds, out, mask, seen = one_sublayer
    real = mask.bool()
    for layer in range(model.config.num_hidden_layers):
        truth = seen[layer][real].double().numpy()
        ours = residual(ds, layer, dtype=np.float64).values
        assert np.abs(ours - truth).max() <= 1e-5 * np.abs(truth).max(), layer
    terms = st.decompose(ds, dtype=np.float64)
    resid = ds.resid_final.values.astype(np.float64)
    assert np.abs(terms.sum("component").values - resid).max() <= 1e-5 * np.abs(resid).max()
    assert st.verify(ds).attrs["max_rel_error"] <= 1e-5
    dla = direct_logit_attribution(ds, 7, dtype=np.float64)
    truth = out.logits[real][:, 7].double().numpy()
    assert np.abs(dla.sum("component").values - truth).max() <= 1e-5 * np.abs(truth).max()


def test_each_layer_writes_its_own_kind_only(one_sublayer):
    model, ds, _, _, _ = one_sublayer
    labels = set(st.decompose(ds, dtype=np.float64).component.values.tolist())
    if model.config.model_type == "falcon_h1":   # mixer and attention side by side, then the MLP, in every layer
        assert labels == {"embed"} | {f"L{layer}{part}" for layer in range(4)
                                      for part in ("_mixer", "_mlp", "_attn_bias", "H0", "H1", "H2", "H3")}
        return
    if model.config.model_type != "nemotron_h":   # pure state-space: every layer one mixer term, no heads
        assert labels == {"embed"} | {f"L{layer}_mixer" for layer in range(4)}
        assert ds.sizes["head"] == 0 and "mlp_out" not in ds
        return
    # Nemotron-H's default layers: mamba, moe, attention, mlp
    assert {"L0_mixer", "L1E0", "L1_shared_expert", "L2H0", "L2H3", "L3_mlp"} <= labels
    assert not {"L0_mlp", "L1_mixer", "L2_mlp", "L3_mixer"} & labels and not any(
        lab.startswith(("L0H", "L1H", "L3H")) for lab in labels)
    assert not ds.mlp_out.isel(layer=[0, 2]).values.any() and not ds.z.isel(layer=[0, 1, 3]).values.any()


@pytest.mark.parametrize("model_type, reason", [("mamba", "none of its layers has an MLP"),
                                                ("nemotron_h", "mixture-of-experts")])
def test_neurons_are_refused_without_dense_mlps(model_type, reason, tmp_path):
    """A pure state-space model has no MLP to take neurons from; Nemotron-H's experts are fused."""
    model = hybrid_model(model_type)
    with pytest.raises(StreamtapError, match=reason):
        with st.tap(model, tmp_path / "s.zarr", neurons=True):
            run(model, *padded_batch(128, [4]))
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("model_type", ["zamba", "zamba2"])
def test_zamba_shared_attention_is_refused_up_front(model_type, tmp_path):
    """Zamba's shared attention writes into the next mixer's input, not the stream: refused, naming that."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from streamtap.errors import UnsupportedArchitectureError

    shared_twice = ({"num_hidden_layers": 6, "attn_layer_period": 2, "attn_layer_offset": 0} if model_type == "zamba" else
                    {"num_hidden_layers": 4, "mamba_headdim": 16, "layers_block_type": ["mamba", "hybrid"] * 2})
    config = AutoConfig.for_model(model_type, hidden_size=64, num_attention_heads=4, vocab_size=128, mamba_d_state=8,
                                  **shared_twice)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(UnsupportedArchitectureError, match="shared attention block.*concatenated with the token embeddings"):
        with st.tap(model, tmp_path / "s.zarr"):
            run(model, *padded_batch(128, [4]))
    assert not (tmp_path / "s.zarr").exists()


def test_falcon_h1_neurons_carry_the_mlp_down_multiplier(tmp_path):
    """Falcon-H1's MLP multiplies its down projection's output inside the module: per-neuron terms
    (act x W_out) add up to the stream only because W_out and b_out carry that multiplier."""
    model = hybrid_model("falcon_h1")
    ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1)
    with st.tap(model, tmp_path / "s.zarr", neurons=True), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    ds = st.open(tmp_path / "s.zarr")
    terms = st.decompose(ds, neurons=True, dtype=np.float64)
    resid = ds.resid_final.values.astype(np.float64)
    assert np.abs(terms.sum("component").values - resid).max() <= 1e-5 * np.abs(resid).max()
    dla = direct_logit_attribution(ds, 7, dtype=np.float64)
    truth = out.logits[mask.bool()][:, 7].double().numpy()
    assert np.abs(dla.sum("component").values - truth).max() <= 1e-5 * np.abs(truth).max()


def test_nemotron_h_neurons_where_only_some_layers_have_an_mlp(tmp_path):
    """Without experts, per-neuron capture works: layers without an MLP store zero activations and W_out."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("nemotron_h", **SMALL, **{**ONE_SUBLAYER["nemotron_h"],
                                                           "layers_block_type": ["mamba", "mlp", "attention", "mlp"]})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    ids, mask = padded_batch(128, LENGTHS, seed=1)
    with st.tap(model, tmp_path / "s.zarr", neurons=True), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    ds = st.open(tmp_path / "s.zarr")
    assert ds.neuron_act.isel(layer=[1, 3]).values.any() and not ds.W_out.isel(layer=[0, 2]).values.any()
    terms = st.decompose(ds, neurons=True, dtype=np.float64)
    resid = ds.resid_final.values.astype(np.float64)
    assert np.abs(terms.sum("component").values - resid).max() <= 1e-5 * np.abs(resid).max()
