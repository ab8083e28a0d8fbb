"""st.effects against computations it did not make: the test's own hooks, the model's own attention
mask, and direct logit attribution from the store."""

import numpy as np
import pytest
import torch

import streamtap as st
from streamtap import Ablate, DropSources, RankReduce
from streamtap.tapping.effects import metrics
from streamtap.models import tiny_model

ARCHS = ["llama", "gpt2", "qwen2"]      # separate projections, fused c_attn with biases, GQA with biases


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    model = tiny_model(request.param)
    rng = np.random.default_rng(0)
    texts = [rng.integers(1, 100, n).tolist() for n in (9, 6, 12)]
    path = tmp_path_factory.mktemp("effects") / "s.zarr"
    st.capture(model, texts, path, batch_size=2)
    return model, texts, st.open(path)


def _hooked(model, texts, hook_module, hook):
    """The corpus's summed metrics with a plain torch forward pre-hook, one text at a time."""
    handle = hook_module.register_forward_pre_hook(hook) if hook is not None else None
    try:
        with torch.no_grad():
            return [model(input_ids=torch.tensor([t])).logits[0].double().numpy() for t in texts]
    finally:
        if handle is not None:
            handle.remove()


def _o_proj(model, layer):
    from streamtap.layouts import bind, layout_for

    b = bind(layout_for(model), model)
    return b.module(b.taps[f"z.{layer}"][0]), b


def test_zero_ablation_equals_the_tests_own_hook(setup):
    model, texts, _ = setup
    o, b = _o_proj(model, 1)
    e = b.d_head

    def zero(module, args):
        z = args[0].clone()
        z[..., 2 * e:3 * e] = 0
        return (z, *args[1:])
    clean, ablated = _hooked(model, texts, o, None), _hooked(model, texts, o, zero)
    sums = sum(metrics(c, a, np.asarray(t)) for c, a, t in zip(clean, ablated, texts))
    n_tok = sum(len(t) for t in texts)
    r = st.effects(model, texts, [Ablate(1, 2)], batch_size=2)
    np.testing.assert_allclose(r["loss"].values[0], sums[0] / (n_tok - len(texts)), rtol=1e-6)
    np.testing.assert_allclose(r["kl"].values[0], sums[1] / n_tok, rtol=1e-5, atol=1e-9)
    assert r["kl"].values[0] > 0


def test_no_change_cases(setup):
    model, texts, _ = setup
    d_head = _o_proj(model, 0)[1].d_head
    none = [np.zeros(len(t), bool) for t in texts]
    r = st.effects(model, texts, {"full OV": RankReduce(1, 1, d_head), "full QK": RankReduce(0, 3, d_head, "QK"),
                                  "drop none": DropSources(1, 1, none), "drop none renorm": DropSources(0, 0, none, True)})
    np.testing.assert_allclose(r["delta_loss"].values, 0, atol=1e-5)
    np.testing.assert_allclose(r["kl"].values, 0, atol=1e-8)


def test_dropping_every_message_is_zero_ablation(setup):
    model, texts, _ = setup
    r = st.effects(model, texts, [Ablate(1, 0), DropSources(1, 0, "all"), DropSources(1, 0, "all", True)])
    np.testing.assert_allclose(r["loss"].values[1:], r["loss"].values[0], rtol=1e-5)
    np.testing.assert_allclose(r["kl"].values[1:], r["kl"].values[0], rtol=1e-4)


def test_renormalised_drop_is_the_model_without_those_keys(setup):
    """Renormalised dropping of keys S in every head of every layer = the model's own attention mask
    with S masked out (what a KV cache without those tokens computes)."""
    model, texts, _ = setup
    b = _o_proj(model, 0)[1]
    keys = [np.isin(np.arange(len(t)), [2, 4]) for t in texts]
    group = [DropSources(l, h, keys, True) for l in b.attn_layers for h in range(b.n_heads)]
    r = st.effects(model, texts, {"drop 2 and 4": group})
    with torch.no_grad():
        clean = [model(input_ids=torch.tensor([t])).logits[0].double().numpy() for t in texts]
        masked = [model(input_ids=torch.tensor([t]), attention_mask=torch.from_numpy(~k)[None].long()).logits[0].double().numpy()
                  for t, k in zip(texts, keys)]
    sums = sum(metrics(c, m, np.asarray(t)) for c, m, t in zip(clean, masked, texts))
    n_tok = sum(len(t) for t in texts)
    np.testing.assert_allclose(r["loss"].values[0], sums[0] / (n_tok - len(texts)), rtol=1e-5)
    np.testing.assert_allclose(r["kl"].values[0], sums[1] / n_tok, rtol=1e-4)


def test_direct_effect_of_zero_ablation_is_minus_the_heads_attribution(setup):
    model, texts, ds = setup
    r = st.effects(model, texts, [Ablate(1, 2), Ablate(0, 1, "mean"), RankReduce(1, 0, 2), RankReduce(0, 0, 2, "QK")],
                   store=ds)
    nxt = np.concatenate([np.r_[t[1:], t[-1]] for t in texts])          # store rows are in text order
    last = np.cumsum([len(t) for t in texts]) - 1
    dla = st.analysis.direct_logit_attribution(ds, nxt, dtype=np.float64).sel(component="L1H2").values
    expected = -np.delete(dla, last).mean()
    np.testing.assert_allclose(r["direct_delta_logit"].values[0], expected, rtol=1e-4, atol=1e-7)
    assert r["direct_delta_logit"].values[3] == 0 and np.all(np.isfinite(r["direct_kl"].values))


def test_bad_input_is_refused_with_the_fix(setup):
    model, texts, ds = setup
    with pytest.raises(st.InputError, match="head 99"):
        st.effects(model, texts, [Ablate(0, 99)])
    with pytest.raises(st.InputError, match="one boolean per token"):
        st.effects(model, texts, [DropSources(0, 0, [np.ones(3, bool)] * len(texts))])
    with pytest.raises(st.InputError, match="tokenizer"):
        st.effects(model, ["a text"], [Ablate(0, 0)])
    with pytest.raises(st.StreamtapError, match="same texts"):
        st.effects(model, texts[:2], [Ablate(0, 0)], store=ds)


def test_total_vs_direct_figure(setup):
    from streamtap.report import figures

    model, texts, ds = setup
    r = st.effects(model, texts, [Ablate(0, 0), Ablate(1, 1, "mean"), RankReduce(1, 2, 3)], store=ds)
    fig = figures.total_vs_direct(r)
    points = sum(len(c.get_offsets()) for c in fig.axes[0].collections)
    assert points == 3
    with pytest.raises(ValueError, match="store="):
        figures.total_vs_direct(st.effects(model, texts, [Ablate(0, 0)]))
