"""Fused W_QK / W_OV, relevance and promotion maps, effective ranks: against the model's own projections."""

import numpy as np
import pytest
import torch

import streamtap as st
from streamtap.analysis import MissingWeightsError

from _analysis_util import tap_forward

WORDS = [5, 9, 17, 33]


def _projections(model, layer, x):
    """q, k, v per query head from the model's own modules, for input rows x (S, d_model)."""
    cfg = model.config
    n_heads, d = cfg.num_attention_heads, cfg.hidden_size
    e = d // n_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    block = (model.base_model.layers if hasattr(model.base_model, "layers") else model.base_model.h)[layer]
    with torch.no_grad():
        if hasattr(block, "self_attn"):
            a = block.self_attn
            q, k, v = (getattr(a, f"{n}_proj")(x) - (getattr(a, f"{n}_proj").bias if getattr(a, f"{n}_proj").bias is not None else 0)
                       for n in "qkv")
        else:
            a = block.attn
            q, k, v = (a.c_attn(x) - a.c_attn.bias).split(d, dim=-1)
    rep = n_heads // n_kv
    q = q.view(-1, n_heads, e)
    k = k.view(-1, n_kv, e).repeat_interleave(rep, dim=1)
    v = v.view(-1, n_kv, e).repeat_interleave(rep, dim=1)
    return q, k, v, block


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_relevance_and_messages_match_the_models_projections(arch):
    t = tap_forward(arch)
    ds = t.ds                       # the store alone carries W_Q, W_K, W_V and W_E
    E = t.model.get_input_embeddings().weight.detach()[WORDS]
    rel = st.analysis.relevance(ds, WORDS, input_norm=False)
    pro = st.analysis.promotion(ds, WORDS, input_norm=False, through_final_norm=False)
    qk = st.analysis.qk_matrix(ds).compute()
    ov = st.analysis.ov_matrix(ds).compute()
    n_heads = ds.sizes["head"]
    for layer in range(ds.sizes["layer"]):
        q, k, v, block = _projections(t.model, layer, E)
        scores = torch.einsum("qhe,khe->hqk", q, k).double().numpy()
        np.testing.assert_allclose(rel.raw.sel(layer=layer).values, scores, atol=1e-4 * np.abs(scores).max())
        np.testing.assert_allclose(np.einsum("sm,hmn,tn->hst", E.double().numpy(),
                                             qk.sel(layer=layer).values.astype(np.float64), E.double().numpy()),
                                   scores, atol=1e-4 * np.abs(scores).max())
        out_proj = block.self_attn.o_proj if hasattr(block, "self_attn") else block.attn.c_proj
        W_U = t.model.lm_head.weight.detach()
        for head in range(n_heads):
            z = torch.zeros(len(WORDS), n_heads, v.shape[-1])
            z[:, head] = v[:, head]
            with torch.no_grad():   # the model's own output projection, fed only this head's values
                msg = out_proj(z.reshape(len(WORDS), -1)) - (out_proj.bias if out_proj.bias is not None else 0)
            want = (msg @ W_U[WORDS].T).double().numpy()
            np.testing.assert_allclose(pro.raw.sel(layer=layer, head=head).values, want, atol=1e-4 * np.abs(want).max())
            np.testing.assert_allclose(E.double().numpy() @ ov.sel(layer=layer, head=head).values,
                                       msg.double().numpy(), atol=1e-4 * np.abs(msg.numpy()).max())
    np.testing.assert_allclose(rel.normalized.sum("key").values, 1.0, atol=1e-9)
    assert ("rotary_note" in rel.attrs) == (arch == "llama")
    assert list(rel.query_id.values) == WORDS and rel.raw.dims == ("layer", "head", "query", "key")


def test_promotion_normalized_is_a_z_score_over_the_vocabulary():
    t = tap_forward("llama")
    ds = t.ds
    pro = st.analysis.promotion(ds, WORDS, layers=[1])
    assert pro.attrs["through_final_norm"] == 1 and st.analysis.relevance(ds, WORDS).attrs["input_norm"] == 1
    # rebuild one head's full logit row and standardise it
    gamma = t.model.base_model.layers[1].input_layernorm
    E = t.model.get_input_embeddings().weight.detach()[WORDS]
    _, _, v, block = _projections(t.model, 1, gamma(E))
    z = torch.zeros(len(WORDS), 4, v.shape[-1])
    z[:, 2] = v[:, 2]
    with torch.no_grad():
        msg = block.self_attn.o_proj(z.reshape(len(WORDS), -1)) * t.model.base_model.norm.weight
        logits = (msg @ t.model.lm_head.weight.T).double().numpy()
    want = (logits - logits.mean(-1, keepdims=True)) / logits.std(-1, keepdims=True)
    np.testing.assert_allclose(pro.normalized.sel(layer=1, head=2).values, want[:, WORDS], atol=1e-4)


def test_effective_ranks_and_truncation_against_explicit_svd():
    t = tap_forward("llama")
    ds = t.ds
    er = st.analysis.effective_rank(ds)
    qk = st.analysis.qk_matrix(ds, dtype=np.float64).compute()
    ov = st.analysis.ov_matrix(ds, dtype=np.float64).compute()
    d_head = ds.sizes["d_head"]
    for name, fused in (("W_QK", qk), ("W_OV", ov)):
        for layer, head in ((0, 0), (1, 3)):
            M = fused.sel(layer=layer, head=head).values
            u, s, vt = np.linalg.svd(M)
            np.testing.assert_allclose(er.singular_value.sel(layer=layer, head=head, matrix=name).values,
                                       s[:d_head], rtol=1e-7, atol=1e-9 * s[0])
            assert s[d_head:].max() <= 1e-8 * s[0]          # rank at most d_head
            p = s[:d_head] / s[:d_head].sum()
            assert abs(float(er.erank_entropy.sel(layer=layer, head=head, matrix=name)) -
                       np.exp(-(p * np.log(p)).sum())) < 1e-8
            for r in (1, 4, d_head):
                approx = (u[:, :r] * s[:r]) @ vt[:r]
                err = np.linalg.norm(M - approx) / np.linalg.norm(M)
                assert abs(float(er.truncation_error.sel(layer=layer, head=head, matrix=name, rank=r)) - err) < 1e-7
    energy = er.erank_energy.values
    assert ((1 <= energy) & (energy <= d_head)).all()
    assert float(er.truncation_error.sel(rank=d_head).max()) < 1e-6


def test_missing_attention_weights_are_named():
    t = tap_forward("gpt2")
    old = t.ds.drop_vars(["W_Q", "W_K", "W_V"])     # a store from before they were kept
    with pytest.raises(MissingWeightsError, match="W_Q"):
        st.analysis.relevance(old, WORDS)
    with pytest.raises(MissingWeightsError, match="W_Q"):
        st.analysis.effective_rank(old)


def test_relevance_gives_learned_sinks_their_share_as_the_model_does():
    """GPT-OSS: each head's sink logit is one more softmax column, so the normalised row is the model's
    own scores over the chosen keys and its sink, and sums to less than one."""
    t = tap_forward("gpt_oss")
    rel = st.analysis.relevance(t.ds, WORDS, input_norm=False)
    E = t.model.get_input_embeddings().weight.detach()[WORDS]
    for layer in range(t.ds.sizes["layer"]):
        a = t.model.model.layers[layer].self_attn
        q, k, _, _ = _projections(t.model, layer, E)
        scores = torch.einsum("qhe,khe->hqk", q, k).double() * a.scaling
        sinks = a.sinks.detach().double()[:, None, None].expand(-1, len(WORDS), 1)
        want = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1].numpy()
        np.testing.assert_allclose(rel.normalized.sel(layer=layer).values, want, rtol=0, atol=1e-6)
    assert (rel.normalized.sum("key").values < 1).all() and "sink" in rel.attrs["normalized"]
