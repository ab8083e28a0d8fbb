"""Self-check of the TransformerLens peer in ``tests/_peers.py``.

The per-head results it returns, summed over heads plus the attention output bias, must equal the
Hugging Face attention module's own output, on real (unpadded) tokens of a right-padded batch;
and each head's result must equal that head's slice of HF's output-projection input times its rows
of W_O (which pins the head order, including under grouped-query attention).
"""
from __future__ import annotations

import numpy as np
import pytest

from _peers import tl_available, tl_head_results

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(not tl_available(), reason="TransformerLens 4.x not installed")


def _tiny_gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    attns = [block.attn for block in model.transformer.h]
    biases = [block.attn.c_proj.bias for block in model.transformer.h]
    # Conv1D stores (in, out): rows are z features, head-major
    w_o = [lambda b=block: b.attn.c_proj.weight for block in model.transformer.h]
    o_projs = [block.attn.c_proj for block in model.transformer.h]
    return model, attns, biases, o_projs, w_o


def _tiny_llama():
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    attns = [layer.self_attn for layer in model.model.layers]
    # nn.Linear stores (out, in); transpose to (z features, d_model)
    w_o = [lambda la=layer: la.self_attn.o_proj.weight.T for layer in model.model.layers]
    o_projs = [layer.self_attn.o_proj for layer in model.model.layers]
    return model, attns, [None] * len(attns), o_projs, w_o


def _hf_attention_outputs(model, attns, o_projs, input_ids, attention_mask):
    """HF attention module outputs and output-projection inputs (z), per layer, float64."""
    out_of: dict[int, torch.Tensor] = {}
    z_of: dict[int, torch.Tensor] = {}
    handles = [
        attn.register_forward_hook(
            lambda _m, _inp, out, layer=layer: out_of.__setitem__(layer, out[0].detach().clone())
        )
        for layer, attn in enumerate(attns)
    ] + [
        o_proj.register_forward_pre_hook(
            lambda _m, inp, layer=layer: z_of.__setitem__(layer, inp[0].detach().clone())
        )
        for layer, o_proj in enumerate(o_projs)
    ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    n = len(attns)
    return (
        [out_of[layer].double().numpy() for layer in range(n)],
        [z_of[layer].double().numpy() for layer in range(n)],
    )


@pytest.mark.parametrize("build", [_tiny_gpt2, _tiny_llama], ids=["gpt2", "llama-gqa"])
def test_tl_head_results_sum_to_hf_attention_output(build):
    torch.manual_seed(0)
    model, attns, biases, o_projs, w_o = build()
    # Non-trivial biases so a missing or double-counted b_O would show.
    with torch.no_grad():
        for bias in biases:
            if bias is not None:
                bias.normal_(0.0, 0.5)
    input_ids = torch.randint(0, 100, (2, 9))
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0  # second sequence right-padded
    input_ids[1, 6:] = 0

    hf_params_before = {k: v.clone() for k, v in model.state_dict().items()}
    results = tl_head_results(model, input_ids, attention_mask)
    # the peer must leave the caller's model untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, hf_params_before[k]), k

    n_layers, n_heads, d_model = len(attns), 4, 64
    assert results.shape == (2, 9, n_layers, n_heads, d_model)

    expected, z = _hf_attention_outputs(model, attns, o_projs, input_ids, attention_mask)
    real = attention_mask.numpy().astype(bool)
    for layer in range(n_layers):
        got = results[:, :, layer].sum(axis=2)
        if biases[layer] is not None:
            got = got + biases[layer].detach().double().numpy()
        want = expected[layer]
        scale = np.abs(want[real]).max()
        err = np.abs(got[real] - want[real]).max()
        assert err <= 1e-5 * scale + 1e-7, (layer, err, scale)
        # each head individually: z[..., h, :] @ W_O[h] from HF's own o_proj input
        w = w_o[layer]().detach().double().numpy().reshape(n_heads, d_model // n_heads, d_model)
        z_heads = z[layer].reshape(2, 9, n_heads, d_model // n_heads)
        want_heads = np.einsum("bphd,hdm->bphm", z_heads, w)
        err_heads = np.abs(results[:, :, layer][real] - want_heads[real]).max()
        assert err_heads <= 1e-5 * scale + 1e-7, (layer, err_heads, scale)
        # heads genuinely differ (not one head carrying everything)
        per_head_norms = np.linalg.norm(results[real][:, layer], axis=-1).mean(axis=0)
        assert (per_head_norms > 1e-3 * scale).all(), per_head_norms
