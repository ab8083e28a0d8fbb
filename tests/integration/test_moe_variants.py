"""Mixtures of experts and attention variants of the long tail, against the model's own numbers.

Each routed expert's term is the model's expert output times its router weight (the router's own
choice and weight, read with a hook), the routed terms and the shared expert's add up to the MoE
block's output, layers without experts write one dense MLP term, GPT-OSS's learned sinks and
half-width rotary tables are what make its recomputed patterns match eager attention, and DeepSeek's
multi-head latent attention keeps per-head z (of the value width) whose W_O sum is the output
projection's own output.
"""

import numpy as np
import pytest
import torch
import zarr

import streamtap as st
import streamtap.attention
from streamtap.models import tiny_model

from _util import padded_batch, run

ROUTER = {"qwen3_moe": "gate", "olmoe": "gate", "gpt_oss": "router", "deepseek_v2": "gate", "deepseek_v3": "gate",
          "mixtral": "gate", "qwen2_moe": "gate", "phimoe": "router", "ernie4_5_moe": "gate", "glm4_moe": "gate",
          "dots1": "gate", "hunyuan_v1_moe": "gate", "flex_olmo": "gate"}
SHARED = {"deepseek_v2": "shared_experts", "deepseek_v3": "shared_experts", "qwen2_moe": "shared_expert",
          "ernie4_5_moe": "shared_experts", "glm4_moe": "shared_experts", "dots1": "shared_experts",
          "hunyuan_v1_moe": "shared_mlp"}
POST_NORM = {"flex_olmo": "post_feedforward_layernorm"}   # the MoE output passes this norm before the stream
DENSE_FIRST = {"qwen3_moe", "deepseek_v2", "deepseek_v3", "ernie4_5_moe", "glm4_moe", "dots1"}   # layer 0 dense


def _captured(arch, layer=1):
    model = tiny_model(arch)
    ids, mask = padded_batch(model.config.vocab_size, [7, 4], seed=7)
    mlp = model.model.layers[layer].mlp
    seen, n = {}, mask.numel()

    def experts_input(module, args):   # the model's own call, not the tap's re-runs on real tokens
        if args[0].shape[0] == n:
            seen["x"] = args[0].detach()
    hooks = [mlp.register_forward_hook(lambda m, a, out: seen.update(out=out[0] if isinstance(out, tuple) else out))]
    if hasattr(mlp, "experts"):
        hooks += [getattr(mlp, ROUTER[arch]).register_forward_hook(lambda m, a, out: seen.update(router=out)),
                  mlp.experts.register_forward_pre_hook(experts_input)]
    if arch in SHARED and hasattr(mlp, "experts"):
        hooks.append(getattr(mlp, SHARED[arch]).register_forward_hook(lambda m, a, out: seen.update(shared=out)))
    return model, mask.reshape(-1).bool(), seen, _tapped(model, ids, mask, hooks)


def _tapped(model, ids, mask, hooks: list):
    """The opened store of one tapped forward of (ids, mask); the test's own ``hooks`` are removed after it."""
    store = zarr.storage.MemoryStore()
    try:
        with st.tap(model, store):
            run(model, ids, mask)
    finally:
        for h in hooks:
            h.remove()
    return st.open(store)


@pytest.mark.parametrize("arch", sorted(ROUTER))
def test_each_routed_expert_writes_its_output_times_its_router_weight(arch):
    model, real, seen, ds = _captured(arch)
    experts = model.model.layers[1].mlp.experts
    _, weights, index = seen["router"]
    x, weights, index = seen["x"][real], weights.detach()[real], index.detach()[real]
    terms = st.decompose(ds, dtype=np.float64)
    at = terms.where(terms.layer == 1, drop=True)
    block_out = seen["out"].detach().reshape(-1, ds.sizes["d_model"])[real].double()
    to_stream = np.ones((ds.sizes["token"], ds.sizes["d_model"]))   # a post-sublayer norm's frozen factor
    if arch in POST_NORM:   # the model's own norm of the whole MoE output, over that output
        norm = getattr(model.model.layers[1], POST_NORM[arch])
        rms = block_out.pow(2).mean(-1, keepdim=True).add(norm.variance_epsilon).sqrt()
        to_stream = (norm.weight.detach().double() / rms).numpy()
        with torch.no_grad():
            np.testing.assert_allclose(block_out.numpy() * to_stream, norm(block_out.float()).double().numpy(), atol=1e-5)
    for token in range(ds.sizes["token"]):
        for slot in range(index.shape[1]):
            e = int(index[token, slot])
            with torch.no_grad():   # expert e alone at weight 1, times the router's weight for it
                unit = experts(x[token:token + 1], index[token:token + 1, slot:slot + 1], torch.ones(1, 1))
            want = (unit[0] * weights[token, slot]).double().numpy() * to_stream[token]
            got = at.sel(component=f"L1E{e}").isel(token=token).values
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (arch, token, e)
        unrouted = set(range(experts.num_experts)) - set(index[token].tolist())
        for e in unrouted:
            assert not at.sel(component=f"L1E{e}").isel(token=token).values.any()
    block_out = block_out.numpy() * to_stream
    ours = at.where(at.kind.isin(["expert", "shared_expert"]), drop=True).sum("component").values
    assert np.abs(ours - block_out).max() <= 1e-5 * np.abs(block_out).max()
    assert ("L1_shared_expert" in at.component.values) == (arch in SHARED)
    if arch in SHARED and arch != "qwen2_moe":   # an ungated shared expert is its output itself
        shared = seen["shared"].detach().reshape(-1, ds.sizes["d_model"])[real].double().numpy()
        np.testing.assert_allclose(at.sel(component="L1_shared_expert").values, shared, rtol=0,
                                   atol=1e-6 * np.abs(shared).max())


@pytest.mark.parametrize("arch", sorted(DENSE_FIRST))
def test_layers_without_experts_write_one_dense_mlp_term(arch):
    model, real, seen, ds = _captured(arch, layer=0)
    assert not hasattr(model.model.layers[0].mlp, "experts") and hasattr(model.model.layers[1].mlp, "experts")
    labels = set(st.decompose(ds).component.values.tolist())
    assert "L0_mlp" in labels and not any(label.startswith("L0E") for label in labels)
    assert "L1_mlp" not in labels and {"L1E0", "L1E1", "L1E2", "L1E3"} <= labels
    dense = seen["out"].detach().reshape(-1, ds.sizes["d_model"])[real].numpy()
    np.testing.assert_array_equal(ds.mlp_out.sel(layer=0).values, dense)
    st.verify(ds)


def _gpt_oss_patterns():
    model = tiny_model("gpt_oss")
    ids, mask = padded_batch(model.config.vocab_size, [11, 6], seed=1)
    store = zarr.storage.MemoryStore()
    with st.tap(model, store, patterns=True), torch.no_grad():
        attentions = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    real = mask[0].bool()
    ref = torch.stack([a[0] for a in attentions])[:, :, real][:, :, :, real].double().numpy()
    return st.open(store), ref


def test_gpt_oss_sinks_and_half_tables_make_the_pattern():
    ds, ref = _gpt_oss_patterns()
    assert ds.attn_sinks.dims == ("layer", "head") and ds.attrs["rotary_style"] == "halves"
    assert ds.attrs["attn_window"] == [4, None]

    def error(store):
        return float(np.abs(st.analysis.attention(store, 0).values - ref).max())

    assert error(ds) <= 1e-5
    assert max(float(streamtap.attention.output_errors(ds, s).max()) for s in (0, 1)) <= st.tolerance(ds)
    # each mechanism matters: without it the recomputed pattern misses the model's
    assert error(ds.assign(attn_sinks=ds.attn_sinks * 0 - 1e9)) > 1e-2
    assert error(ds.assign_attrs(rotary_style="half")) > 1e-2
    assert error(ds.assign_attrs(attn_window=[None, None])) > 1e-2


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_latent_attention_keeps_per_head_z_and_refuses_patterns(arch, tmp_path):
    model = tiny_model(arch)
    ids, mask = padded_batch(model.config.vocab_size, [7, 4], seed=2)
    seen = {}
    o_proj = model.model.layers[1].self_attn.o_proj
    hook = o_proj.register_forward_hook(lambda m, a, out: seen.update(out=out.detach()))
    store = zarr.storage.MemoryStore()
    with st.tap(model, store):
        run(model, ids, mask)
    hook.remove()
    ds = st.open(store)
    assert (ds.sizes["head"], ds.sizes["d_head"]) == (4, model.config.v_head_dim)
    heads = np.einsum("thd,hdm->tm", ds.z.sel(layer=1).values.astype(np.float64),
                      ds.W_O.sel(layer=1).values.astype(np.float64)) + ds.attn_bias.sel(layer=1).values
    want = seen["out"].reshape(-1, ds.sizes["d_model"])[mask.reshape(-1).bool()].double().numpy()
    assert np.abs(heads - want).max() <= 1e-5 * np.abs(want).max()
    with pytest.raises(st.StreamtapError, match="multi-head latent attention.*Capture without it"):
        st.tap(model, tmp_path / "p.zarr", patterns=True)
    assert not (tmp_path / "p.zarr").exists()


def _config_model(config_name: str, **fields):
    """A tiny model straight from a transformers config (types without a TINY_ARCHS entry), norms perturbed."""
    import transformers

    config = getattr(transformers, config_name)(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                max_position_embeddings=64, initializer_range=0.2, **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.2 * torch.randn(p.shape))
    return model.eval()


def _tap_with_hooks(model, hooks: dict) -> tuple[dict, torch.Tensor, object]:
    """Tap a padded batch while ``hooks`` ({name: module}) copy each module's output as the model makes it
    (the batch's forward, after the self-check's probe)."""
    ids, mask = padded_batch(model.config.vocab_size, [7, 4], seed=7)
    seen = {}

    def keep(name):
        def hook(module, args, out):   # returns None: the model's output is left as it is
            seen[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()   # the last call: the batch
        return hook
    ds = _tapped(model, ids, mask, [m.register_forward_hook(keep(name)) for name, m in hooks.items()])
    return seen, mask.reshape(-1).bool(), ds


def test_llama4_experts_on_router_weighted_input_write_their_own_rows():
    """Llama-4's experts read x times each expert's score and return one block of rows per expert: a
    routed expert's term is its own block's row for the token, the rest write nothing, and the routed
    terms plus the shared expert's add up to the mixture's output."""
    model = _config_model("Llama4TextConfig", intermediate_size=32, intermediate_size_mlp=128, num_local_experts=4,
                          num_experts_per_tok=2, moe_layers=[1], interleave_moe_layer_step=1)
    moe = model.model.layers[1].feed_forward
    seen, real, ds = _tap_with_hooks(model, {"rows": moe.experts, "scores": moe.router, "shared": moe.shared_expert,
                                             "out": moe})
    n_experts = moe.experts.num_experts
    rows = seen["rows"].reshape(n_experts, -1, 64)[:, real].double()
    scores = seen["scores"][real]
    terms = st.decompose(ds, dtype=np.float64)
    at = terms.where(terms.layer == 1, drop=True)
    routed_sum = np.zeros((ds.sizes["token"], 64))
    for token in range(ds.sizes["token"]):
        routed = set(scores[token].topk(2).indices.tolist())
        for e in range(n_experts):
            label = f"L1E{e}"
            got = at.sel(component=label).isel(token=token).values if label in at.component else np.zeros(64)
            want = rows[e, token].numpy() if e in routed else np.zeros(64)
            assert np.abs(got - want).max() <= 1e-5 * max(np.abs(rows[:, token]).max().item(), 1e-30), (token, e)
            routed_sum[token] += got
    shared = seen["shared"].reshape(-1, 64)[real].double().numpy()
    out = seen["out"].reshape(-1, 64)[real].double().numpy()
    assert np.abs(routed_sum + shared - out).max() <= 1e-5 * np.abs(out).max()
    st.verify(ds)


def test_a_factor_outside_the_experts_is_carried_by_each_routed_share():
    """Laguna multiplies the routed experts' sum by moe_routed_scaling_factor outside its experts module:
    the stored shares carry it, so they and the shared expert add up to the mixture's output."""
    model = _config_model("LagunaConfig", intermediate_size=128, moe_intermediate_size=32,
                          shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                          moe_routed_scaling_factor=2.5, layer_types=["full_attention", "sliding_attention"],
                          mlp_layer_types=["dense", "sparse"], num_attention_heads_per_layer=[4, 4])
    moe = model.model.layers[1].mlp
    seen, real, ds = _tap_with_hooks(model, {"out": moe})
    terms = st.decompose(ds, dtype=np.float64)
    at = terms.where(terms.layer == 1, drop=True)
    shares = [str(c) for c in at.component.values if str(c).startswith("L1E") or str(c) == "L1_shared_expert"]
    assert any(c.startswith("L1E") for c in shares) and "L1_shared_expert" in shares, shares
    total = at.sel(component=shares).sum("component").values
    out = seen["out"].reshape(-1, 64)[real].double().numpy()
    assert np.abs(total - out).max() <= 1e-5 * np.abs(out).max()
    st.verify(ds)

