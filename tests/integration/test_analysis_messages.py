"""Empty messages, the accumulating prediction and neurons as key-value memories, against the model."""

import numpy as np
import pytest
import torch

import streamtap as st
from streamtap.analysis import MissingWeightsError

from _analysis_util import model_source_messages, tap_forward


@pytest.fixture(scope="module")
def llama():
    return tap_forward("llama", neurons=True)


def test_empty_source_messages(llama):
    t, ds = llama, llama.ds     # an untied model: the store carries W_E (tied ones say it is W_U)
    em = st.analysis.empty_messages(ds, n_tokens=3).compute()
    msgs = model_source_messages(t.model, t.ids, t.mask)
    np.testing.assert_allclose(st.analysis.source_messages(ds).values, msgs, rtol=1e-4, atol=1e-5)
    norms = np.linalg.norm(msgs, axis=-1)
    np.testing.assert_allclose(em.norm.values, norms, rtol=1e-4, atol=1e-5)
    first = np.asarray(ds.pos.values) == 0
    np.testing.assert_array_equal(em.first.values, first)
    typical = np.exp(np.log(norms[~first]).mean(0))                           # geometric mean, first tokens out
    np.testing.assert_allclose(em.typical_norm.values, typical, rtol=1e-4)
    np.testing.assert_allclose(em.relative_norm.values, norms / typical, rtol=1e-4)
    ids = np.asarray(ds.token_id.values)
    counts = np.bincount(ids, minlength=ds.sizes["vocab"])
    most, rare = st.analysis.frequency_extremes(ds, 3)
    assert list(counts[most]) == sorted(counts[counts > 0], reverse=True)[:3]
    assert list(counts[rare]) == sorted(counts[counts > 0])[:3]
    E = t.model.get_input_embeddings().weight.detach().double().numpy()
    unit = E / np.maximum(np.linalg.norm(E, axis=-1, keepdims=True), 1e-30)   # the pad row is zero
    for name in ("frequent", "rare", "random"):
        f = unit[em.attrs[f"{name}_ids"]].mean(0)
        f /= np.linalg.norm(f)
        np.testing.assert_allclose(em[f"cos_{name}"].values, msgs @ f / norms, atol=1e-4)
    assert np.abs(em.cos_isotropic.values).max() <= 1 + 1e-6
    summary = st.analysis.empty_message_summary(em, threshold=0.3)
    rel = norms / typical
    np.testing.assert_allclose(summary.fraction_empty.values, (rel[~first] < 0.3).mean(0), atol=1e-6)
    np.testing.assert_allclose(summary.first_relative_norm.values, rel[first].mean(0), rtol=1e-4)
    hist = summary.histogram.sel(group="rest").values
    assert hist.sum() == (~first).sum() * ds.sizes["layer"] * ds.sizes["head"]
    assert summary.histogram.sel(group="first").values.sum() == first.sum() * ds.sizes["layer"] * ds.sizes["head"]


def test_frequency_from_merge_ranks():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5}
    model = tokenizers.models.BPE(vocab=vocab, merges=[("a", "b"), ("b", "c"), ("ab", "c")])
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(model))
    ranks = st.analysis.merge_ranks(tok)
    np.testing.assert_array_equal(ranks.values, [np.nan, np.nan, np.nan, 0, 2, 1])
    most, rare = st.analysis.frequency_extremes(None, 1, ranks)
    assert (most[0], rare[0]) == (3, 4)


def test_accumulation_pca(llama):
    t, ds = llama, llama.ds
    acc = st.analysis.accumulation_pca(ds, n_components=2, k=3).compute()
    np.testing.assert_array_equal(acc.final_top_id.values, t.logits.argmax(-1))
    for i in (0, 5, 12):   # one token: the residual entering each layer and the final one
        X = np.stack([h[i] for h in t.hidden[:ds.sizes["layer"]]] + [ds.resid_final.values[i]])
        s = np.linalg.svd(X - X.mean(0), compute_uv=False)
        np.testing.assert_allclose(acc.explained_variance_ratio.values[i], (s ** 2 / (s ** 2).sum())[:2], atol=1e-5)
    assert (acc.agrees.values == (acc.pc1_top_id.values[:, 0] == acc.final_top_id.values)).all()
    assert ((acc.final_rank_in_pc1.values == 0) == acc.agrees.values).all()


def test_neuron_memories(llama):
    t, ds = llama, llama.ds
    mem = st.analysis.neuron_memories(ds, ["L1N7", (0, 3)], k=4, context=3)
    act = ds.neuron_act.values
    for j, (layer, n) in enumerate(((1, 7), (0, 3))):
        order = np.argsort(-act[:, layer, n], kind="stable")[:4]
        np.testing.assert_allclose(mem.top_activation.values[j], act[order, layer, n])
        np.testing.assert_array_equal(mem.top_token_id.values[j], ds.token_id.values[mem.top_token.values[j]])
        down = t.model.base_model.layers[layer].mlp.down_proj.weight.detach()[:, n]
        with torch.no_grad():
            logits = t.model.lm_head(down * t.model.base_model.norm.weight).double().numpy()
        np.testing.assert_array_equal(mem.promoted_id.values[j], np.argsort(-logits)[:4])
        np.testing.assert_array_equal(mem.suppressed_id.values[j], np.argsort(logits)[:4])
    assert list(mem.label.values) == ["L1N7", "L0N3"]
    with pytest.raises(MissingWeightsError, match="neuron_act"):
        st.analysis.neuron_memories(tap_forward("llama").ds, ["L0N1"])
