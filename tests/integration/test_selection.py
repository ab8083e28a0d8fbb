"""Selective capture (issue 24 items 1-2): layers/heads/terms/positions keep part of the terms and sum the
rest into one per-token ``rest`` term; ``project`` stores contributions onto directions. Ground truth is a
full store of the same batch (itself checked against the model's hidden states elsewhere) and the model's
own logits."""

import numpy as np
import pytest
import torch

import streamtap as st
from streamtap.analysis import direct_logit_attribution
from streamtap.errors import InputError, OptionError
from streamtap.models import tiny_model

ARCHS = ("gpt2", "llama", "opt-post-ln", "bert", "gemma2")   # pre-LN, post-LN, sandwich norms


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, model.config.vocab_size, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def _capture(model, path, ids, mask, **options):
    with st.tap(model, str(path), **options):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask)


def _key(ds):
    return list(zip(ds.seq.values.tolist(), ds.pos.values.tolist()))


def _at(full, part):
    """The full store's tokens that the selective store kept."""
    index = {k: i for i, k in enumerate(_key(full))}
    return full.isel(token=[index[k] for k in _key(part)])


@pytest.mark.parametrize("arch", ARCHS)
def test_rest_is_exactly_what_was_left_out(arch, tmp_path):
    model = tiny_model(arch).eval()
    ids, mask = _batch(model)
    _capture(model, tmp_path / "full.zarr", ids, mask)
    _capture(model, tmp_path / "sel.zarr", ids, mask, layers=[1], heads=[0, 2], positions="last:4")
    full, sel = st.open(tmp_path / "full.zarr"), st.open(tmp_path / "sel.zarr")
    assert sel.sizes["token"] == 4 + 4 + 4 and sel.sizes["layer"] == 1 and sel.sizes["head"] == 2
    assert list(sel.layer.values) == [1] and list(sel["head"].values) == [0, 2]
    ref = _at(full, sel)
    np.testing.assert_array_equal(sel.resid_final.values, ref.resid_final.values)
    err = st.verify(sel)
    assert err.attrs["max_rel_error"] <= 1e-5
    terms, parts = st.decompose(ref).compute(), st.decompose(sel).compute()
    kept = [c for c in parts.component.values if c != "rest"]
    np.testing.assert_allclose(parts.sel(component=kept).values, terms.sel(component=kept).values, atol=1e-5, rtol=1e-5)
    left = [c for c in terms.component.values if c not in set(kept)]
    assert "L0H0" in left and "L1H1" in left and "L1H0" not in left and "embed" not in left
    expected = terms.sel(component=left).sum("component").values
    scale = np.abs(ref.resid_final.values).max()
    assert np.abs(sel.rest.values - expected).max() <= 1e-5 * scale
    assert "selection" in sel.attrs and "selection" not in full.attrs


MOE = ("mixtral", "qwen2_moe", "deepseek_v3")   # routed experts only; a gated shared expert; a dense first layer
EXPERT_VARS = ("expert_out", "expert_index", "shared_expert_out")


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("options", [dict(layers=[1], heads=[0], positions="last:4"), dict(layers=[0], terms=("z", "embed")),
                                     dict(terms=("mlp_out",))])
def test_moe_rest_is_exactly_what_was_left_out(arch, options, tmp_path):
    """A mixture's expert shares are its MLP's terms: a kept layer keeps them per routing slot as a full store has
    them; a left-out layer's shares and shared expert, a dense layer's MLP and every other term go into rest."""
    model = tiny_model(arch).eval()
    ids, mask = _batch(model)
    _capture(model, tmp_path / "full.zarr", ids, mask)
    _capture(model, tmp_path / "sel.zarr", ids, mask, **options)
    full, sel = st.open(tmp_path / "full.zarr"), st.open(tmp_path / "sel.zarr")
    ref = _at(full, sel)
    layers = list(options.get("layers", range(full.sizes["layer"])))
    mlp = "mlp_out" in options.get("terms", ("mlp_out",))
    stored = [name for name in EXPERT_VARS if name in full]
    assert "expert_out" in stored and ("shared_expert_out" in stored) == (arch != "mixtral")
    for name in stored:
        if mlp:
            np.testing.assert_array_equal(sel[name].values, ref[name].isel(layer=layers).values)
        else:
            assert name not in sel
    assert st.verify(sel).attrs["max_rel_error"] <= 1e-5
    terms, parts = st.decompose(ref).compute(), st.decompose(sel).compute()
    kept = [c for c in parts.component.values if c != "rest"]
    np.testing.assert_allclose(parts.sel(component=kept).values, terms.sel(component=kept).values, atol=1e-5, rtol=1e-5)
    experts = terms.component[terms.kind.isin(["expert", "shared_expert"])]
    want = {str(c) for c, layer in zip(experts.values, experts.layer.values) if mlp and layer in layers}
    assert {str(c) for c in experts.values} & set(kept) == want
    left = [c for c in terms.component.values if c not in set(kept)]
    assert len(left) > (0 if want else len(experts))
    expected = terms.sel(component=left).sum("component").values
    scale = np.abs(ref.resid_final.values).max()
    assert np.abs(sel.rest.values - expected).max() <= 1e-5 * scale


@pytest.mark.parametrize("arch", MOE)
def test_moe_projections_equal_offline_dla_of_a_full_store(arch, tmp_path):
    """Projections give each expert (and the shared expert) its own component, as offline DLA of a full store
    does; with a selection, the left-out layers' experts are summed into rest."""
    model = tiny_model(arch).eval()
    ids, mask = _batch(model, seed=1)
    _capture(model, tmp_path / "full.zarr", ids, mask)
    probe = np.random.default_rng(0).standard_normal(model.config.hidden_size)
    _capture(model, tmp_path / "p.zarr", ids, mask, project={"t5": 5, "unembed_top": 1})
    _capture(model, tmp_path / "v.zarr", ids, mask, project={"probe": probe})
    _capture(model, tmp_path / "s.zarr", ids, mask, project={"t5": 5}, layers=[1], heads=[1], positions="last:2")
    full, proj, part = st.open(tmp_path / "full.zarr"), st.open(tmp_path / "p.zarr"), st.open(tmp_path / "s.zarr")

    def close(got, want):
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-5 * scale, np.abs(got - want).max() / scale

    dla = direct_logit_attribution(full, 5).compute()
    p = proj.projection.sel(direction="t5").compute()
    assert list(p.component.values) == list(dla.component.values) and "L1E0" in p.component.values
    close(p.values.T, dla.values)
    top = proj.projection_top_id.values[:, 0]
    close(proj.projection.sel(direction="top1").values.T, direct_logit_attribution(full, top).compute().values)
    # a probe's components against the full store's terms; verify measures each sum against its summands, so a
    # probe whose total nearly cancels on some token verifies too
    terms = st.decompose(full).compute()
    close(st.open(tmp_path / "v.zarr").projection.sel(direction="probe").values.T[: terms.sizes["component"]],
          terms.values @ probe.astype(np.float32))
    dla = direct_logit_attribution(_at(full, part), 5).compute()
    s = part.projection.sel(direction="t5").compute()
    kept = [c for c in s.component.values if c != "rest"]
    assert "L1E0" in kept and "L0E0" not in kept and "L0H1" not in kept
    close(s.sel(component=kept).values.T, dla.sel(component=kept).values)
    close(s.sel(component="rest").values, dla.sel(component=[c for c in dla.component.values
                                                              if c not in set(kept)]).sum("component").values)
    for ds in (proj, part, st.open(tmp_path / "v.zarr")):
        assert st.verify(ds).attrs["max_rel_error"] <= 1e-5


@pytest.mark.parametrize("arch", ("opt-post-ln", "bert"))
def test_probe_projections_through_post_ln_norms_equal_the_full_decomposition(arch, tmp_path):
    model = tiny_model(arch).eval()
    ids, mask = _batch(model, seed=3)
    _capture(model, tmp_path / "full.zarr", ids, mask)
    probe = np.random.default_rng(1).standard_normal(model.config.hidden_size)
    _capture(model, tmp_path / "p.zarr", ids, mask, project={"probe": probe}, heads=[1])
    full, proj = st.open(tmp_path / "full.zarr"), st.open(tmp_path / "p.zarr")
    terms = st.decompose(full).compute()
    want = terms.values @ probe.astype(np.float32)                       # (component, token)
    p = proj.projection.sel(direction="probe").compute()
    kept = [c for c in p.component.values if c != "rest"]
    index = {c: i for i, c in enumerate(terms.component.values)}
    scale = np.abs(want).max()
    assert np.abs(p.sel(component=kept).values.T - want[[index[c] for c in kept]]).max() <= 1e-5 * scale
    rest = want[[i for c, i in index.items() if c not in set(kept)]].sum(0)
    assert np.abs(p.sel(component="rest").values - rest).max() <= 1e-5 * scale
    assert st.verify(proj).attrs["max_rel_error"] <= 1e-5


@pytest.mark.parametrize("arch", ("gpt2", "gemma2"))
def test_projections_equal_offline_dla_of_a_full_store(arch, tmp_path):
    model = tiny_model(arch).eval()
    ids, mask = _batch(model, seed=1)
    out = _capture(model, tmp_path / "full.zarr", ids, mask)
    probe = np.random.default_rng(0).standard_normal(model.config.hidden_size)
    _capture(model, tmp_path / "p.zarr", ids, mask, project={"t5": 5, "probe": probe, "unembed_top": 2})
    full, proj = st.open(tmp_path / "full.zarr"), st.open(tmp_path / "p.zarr")
    assert "resid_final" not in proj and "z" not in proj and "rest" not in proj   # no d_model terms at all
    assert list(proj.direction.values) == ["t5", "probe", "top1", "top2"]
    p = proj.projection.compute()

    def close(got, want):
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-5 * scale, np.abs(got - want).max() / scale

    dla = direct_logit_attribution(full, 5).compute()
    close(p.sel(direction="t5").values.T, dla.values)
    top = proj.projection_top_id.values
    logits = out.logits[mask.bool()].numpy()
    np.testing.assert_array_equal(top[:, 0], logits.argmax(-1))
    per_token = direct_logit_attribution(full, top[:, 1]).compute()
    close(p.sel(direction="top2").values.T, per_token.values)
    if not full.attrs.get("final_logit_softcap"):
        close(proj.projection_total.sel(direction="top1").values, logits.max(-1))
    terms = st.decompose(full).compute()
    close(p.sel(direction="probe").values.T[: terms.sizes["component"]], terms.values @ probe.astype(np.float32))
    assert st.verify(proj).attrs["max_rel_error"] <= 1e-5


@pytest.mark.parametrize("arch", ("llama", "mixtral"))
def test_verify_measures_a_near_cancelling_projection_against_its_summands(arch, tmp_path):
    """A probe nearly orthogonal to a token's final residual sums to ~0 there: verify measures the sum against
    the magnitude of its summands (as the residual invariant does), so the store verifies; a projection moved
    by 1e-4 of that magnitude still fails."""
    import zarr

    model = tiny_model(arch).eval()
    ids, mask = _batch(model, seed=4)
    _capture(model, tmp_path / "full.zarr", ids, mask)
    resid = st.open(tmp_path / "full.zarr").resid_final.values.astype(np.float64)
    probe = np.random.default_rng(2).standard_normal(model.config.hidden_size)
    probe -= (probe @ resid[5]) / (resid[5] @ resid[5]) * resid[5]      # orthogonal to token 5's final residual
    _capture(model, tmp_path / "p.zarr", ids, mask, project={"probe": probe})
    ds = st.open(tmp_path / "p.zarr")
    total = np.abs(ds.projection_total.sel(direction="probe").values)
    parts = np.abs(ds.projection.sel(direction="probe").values).sum(1)
    assert total[5] < 1e-5 * parts[5]                                  # the sum cancels at token 5
    assert st.verify(ds).attrs["max_rel_error"] <= 1e-5
    group = zarr.open_group(tmp_path / "p.zarr", mode="r+")
    d = list(ds.direction.values).index("probe")
    value = group["projection"][5, 0, d]
    group["projection"][5, 0, d] = value + 1e-4 * parts[5]
    with pytest.raises(st.DecompositionError, match="1 of"):
        st.verify(st.open(tmp_path / "p.zarr"))


def test_projections_with_a_selection_sum_the_rest(tmp_path):
    model = tiny_model("llama").eval()
    ids, mask = _batch(model, seed=2)
    _capture(model, tmp_path / "full.zarr", ids, mask)
    _capture(model, tmp_path / "s.zarr", ids, mask, layers=[0], terms=("z",), project={"t": 7}, positions="last")
    full, s = st.open(tmp_path / "full.zarr"), st.open(tmp_path / "s.zarr")
    assert s.sizes["token"] == 3 and "mlp_out" not in s and "embed" not in s and "z" in s
    assert st.verify(s).attrs["max_rel_error"] <= 1e-5
    dla = direct_logit_attribution(_at(full, s), 7).compute()
    p = s.projection.sel(direction="t").compute()
    kept = [c for c in p.component.values if c != "rest"]
    np.testing.assert_allclose(p.sel(component=kept).values.T, dla.sel(component=kept).values, rtol=1e-5, atol=1e-5)
    rest = dla.sel(component=[c for c in dla.component.values if c not in set(kept)]).sum("component")
    np.testing.assert_allclose(p.sel(component="rest").values, rest.values, rtol=1e-5, atol=1e-5)


def test_positions_mask_and_callable(tmp_path):
    model = tiny_model("gpt2").eval()
    ids, mask = _batch(model)
    chosen = torch.zeros_like(ids, dtype=torch.bool)
    chosen[0, 2] = chosen[2, 5] = True
    _capture(model, tmp_path / "m.zarr", ids, mask, positions=chosen)
    assert _key(st.open(tmp_path / "m.zarr")) == [(0, 2), (2, 5)]
    target = int(ids[1, 3])
    _capture(model, tmp_path / "c.zarr", ids, mask, positions=lambda x: x == target)
    ds = st.open(tmp_path / "c.zarr")
    assert (ds.token_id.values == target).all() and (1, 3) in _key(ds)
    assert st.verify(ds).attrs["max_rel_error"] <= 1e-5


def test_default_store_is_unchanged(tmp_path):
    model = tiny_model("gpt2").eval()
    ids, mask = _batch(model)
    _capture(model, tmp_path / "d.zarr", ids, mask)
    ds = st.open(tmp_path / "d.zarr")
    assert "selection" not in ds.attrs and "rest" not in ds and "projection" not in ds and "layer" not in ds.coords


@pytest.mark.parametrize("options, message", [
    (dict(layers=[7]), "index 7 does not exist"),
    (dict(heads=[0, 99]), "index 99 does not exist"),
    (dict(layers=[]), "empty selection"),
    (dict(terms=()), "empty selection"),
    (dict(terms=("z", "attn")), "unknown kind 'attn'"),
    (dict(project={"v": np.ones(3)}), "d_model"),
    (dict(project={"w": "hello world again"}), "not one"),
    (dict(positions="first"), "positions"),
])
def test_bad_selection_fails_before_anything_is_written(options, message, tmp_path):
    from streamtap.models.tokenizer import word_level_tokenizer

    model = tiny_model("gpt2").eval()
    ids, mask = _batch(model)
    tok = word_level_tokenizer(["hello world again"], model.config.vocab_size)
    with pytest.raises(OptionError, match=message):
        _capture(model, tmp_path / "x.zarr", ids, mask, tokenizer=tok, **options)
    assert not (tmp_path / "x.zarr").exists()


def test_positions_callable_of_the_wrong_shape_fails_before_anything_is_written(tmp_path):
    model = tiny_model("gpt2").eval()
    ids, mask = _batch(model)
    with pytest.raises(InputError, match="must be a boolean"):
        _capture(model, tmp_path / "x.zarr", ids, mask, positions=lambda x: x[:, 0] > 0)
    assert not (tmp_path / "x.zarr" / "z").exists() and not (tmp_path / "x.zarr" / "zarr.json").exists()


def test_analyses_that_need_left_out_terms_refuse_naming_the_option(tmp_path):
    from streamtap.errors import StreamtapError

    model = tiny_model("gpt2").eval()
    ids, mask = _batch(model)
    _capture(model, tmp_path / "s.zarr", ids, mask, heads=[0])
    ds = st.open(tmp_path / "s.zarr")
    for call in (lambda: direct_logit_attribution(ds, 3), lambda: st.decompose(ds, upto=1)):
        with pytest.raises(StreamtapError, match="heads=\\[0\\]"):
            call()


def test_append_must_select_the_same(tmp_path):
    """A store holds one selection: appending another (or a full capture) would mix stores whose ``rest``
    means different things, so it is refused before anything is written; the same selection appends."""
    from streamtap.errors import StoreMismatchError
    model = tiny_model("gpt2").eval()
    ids, mask = _batch(model)
    path = tmp_path / "sel.zarr"
    _capture(model, path, ids, mask, layers=[1], positions="last")
    for other in ({"layers": [0], "positions": "last"}, {}):
        with pytest.raises(StoreMismatchError, match="selection"):
            _capture(model, path, ids, mask, append=True, **other)
    assert st.open(path).sizes["token"] == 3
    _capture(model, path, ids, mask, append=True, layers=[1], positions="last")
    assert st.open(path).sizes["token"] == 6 and st.verify(st.open(path)).attrs["max_rel_error"] <= 1e-5


def test_positions_cut_in_the_hooks_copy_only_the_stored_tokens(monkeypatch, tmp_path):
    """A positions= capture that nothing else reads the other tokens of copies only its stored tokens off the
    forward (the batch's buffers hold those rows), and stores what a full store holds at them."""
    from streamtap.tapping.batch import Recorder

    model = tiny_model("gpt2").eval()
    ids, mask = _batch(model)
    made = []
    slots = Recorder.slots
    monkeypatch.setattr(Recorder, "slots", lambda self, *a, **k: made.append(slots(self, *a, **k)) or made[-1])
    _capture(model, tmp_path / "last.zarr", ids, mask, positions="last:2")
    assert {t.shape[0] for t in made[-1].terms().values()} == {6}   # the capture's forward (after any self-check)
    _capture(model, tmp_path / "full.zarr", ids, mask)
    full, part = st.open(tmp_path / "full.zarr"), st.open(tmp_path / "last.zarr")
    for name in [n for n, v in part.data_vars.items() if "token" in v.dims]:
        np.testing.assert_array_equal(part[name].values, _at(full, part)[name].values)


@pytest.mark.parametrize("at, stored", [(2, False), (8, True)])
def test_positions_cut_in_the_hooks_still_refuse_non_finite_tokens(at, stored, tmp_path):
    """A non-finite activation is refused with its row and position whether or not its token is stored:
    the hooks check every real token's final residual before they cut the batch."""
    model = tiny_model("gpt2").eval()
    ids, mask = _batch(model)
    with torch.no_grad():
        model.transformer.wte.weight[7] = float("inf")
    ids[0, at] = 7
    # the tap's own 8-token probe meets the infinite row too: it says so and skips the layout check
    with pytest.warns(UserWarning, match="non-finite values on the self-check probe"), \
            pytest.raises(st.NonFiniteError, match=f"row 0 pos {at}"):
        _capture(model, tmp_path / "a.zarr", ids, mask, positions="last")
    assert not (tmp_path / "a.zarr").exists()
