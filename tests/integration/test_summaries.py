"""Summaries while capturing (issue 24 item 3): running statistics, quantile sketches and top-k contexts
kept online over every real token equal the same statistics computed offline with numpy from a full store
of the same corpus (which the rest of the suite checks against the model's own hidden states). Ground truth
for head norms is the store's ``head_output`` (z @ W_O on the read side), for neurons the stored activations,
for projections a full projecting store."""

import json
import os

import numpy as np
import pytest
import torch
import zarr

import streamtap as st
from streamtap.errors import OptionError
from streamtap.io import summaries as S
from streamtap.models import tiny_model

ALPHA = 0.05
SETTINGS = {"top_k": 5, "window": 3, "alpha": ALPHA}
NORM_RTOL = 1e-5   # norms online in float32 (a head's as sqrt(z W_O W_O^T z)) against float64 ones of z @ W_O offline
NORMS = ("head", "mlp")
PAD = 0            # the padding id; never a real token below


def _corpus(model, n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (n,), generator=g).tolist()
    return [torch.randint(1, model.config.vocab_size, (k,), generator=g).tolist() for k in lengths]


def _offline(full, group, direction_store=None):
    """(token, component) values of a group from a full store, float64, and each token's (seq, pos)."""
    if group == "head":
        x = np.linalg.norm(full.head_output.values.astype(np.float64), axis=-1)
        x = x.reshape(x.shape[0], -1)
    elif group == "mlp":
        x = np.linalg.norm(full.mlp_out.values.astype(np.float64), axis=-1)
    elif group == "neuron":
        x = full.neuron_act.values.astype(np.float64)
        x = x.reshape(x.shape[0], -1)
    else:
        p = direction_store.projection.values.astype(np.float64)
        x = p.reshape(p.shape[0], -1)
    return x


def _check_group(res, x, full, group):
    """Every statistic of ``res`` (one group of ``summaries``) against numpy on ``x`` (token, component)."""
    tol = NORM_RTOL if group in NORMS else 1e-9
    assert (res["count"].values == x.shape[0]).all()
    np.testing.assert_allclose(res["mean"].values, x.mean(0), rtol=tol, atol=1e-12)
    np.testing.assert_allclose(res["var"].values, x.var(0), rtol=max(tol * 4, 1e-8), atol=1e-10)
    np.testing.assert_allclose(res["min"].values, x.min(0), rtol=tol, atol=1e-12)
    np.testing.assert_allclose(res["max"].values, x.max(0), rtol=tol, atol=1e-12)
    # quantiles: within the sketch's documented guarantee of numpy's order statistic
    settings = S.Settings(**json.loads(res.attrs["sketch"]))
    exact = np.quantile(x, res.q.values, axis=0, method="lower").T          # (component, q)
    est = res["quantile"].values
    bound = settings.alpha + S.ROUNDING + (NORM_RTOL if group in NORMS else 0)
    small = np.abs(exact) < settings.low
    rel = np.abs(est - exact) / np.where(small, 1, np.abs(exact))
    assert (rel[~small] <= bound).all(), rel[~small].max()
    assert (np.abs(est - exact)[small] <= settings.low).all()
    # top-k: the k largest values, sorted, each at a distinct token that holds it; every token above the
    # k-th value among them (ties at the k-th may go either way); each window read from the stored ids
    seq, pos = full.seq.values, full.pos.values
    row = {(int(s), int(p)): i for i, (s, p) in enumerate(zip(seq, pos))}
    ids = {(int(s), int(p)): int(t) for s, p, t in zip(seq, pos, full.token_id.values)}
    k, w = res.sizes["rank"], settings.window
    for c in range(x.shape[1]):
        order = np.argsort(-x[:, c], kind="stable")[:k]
        np.testing.assert_allclose(res.top_value.values[c], x[order, c], rtol=tol)
        got = list(zip(res.top_seq.values[c].tolist(), res.top_pos.values[c].tolist()))
        assert len(set(got)) == k
        np.testing.assert_allclose(x[[row[g] for g in got], c], res.top_value.values[c], rtol=tol)
        kth = x[order[-1], c]
        above = {(int(seq[i]), int(pos[i])) for i in order if x[i, c] > kth + tol * abs(kth)}
        assert above <= set(got), (group, c)
        for r in range(k):
            s, p = int(res.top_seq.values[c, r]), int(res.top_pos.values[c, r])
            expect = [ids.get((s, p + o), -1) for o in range(-w, w + 1)]
            assert res.top_window.values[c, r].tolist() == expect
            assert PAD not in res.top_window.values[c, r].tolist()    # padding never enters a context


@pytest.mark.parametrize("arch,host,int32_tokens,head_values", [
    ("gpt2", "compiled", None, None), ("llama", "compiled", 25, 1), ("gpt2", "numpy", None, None),
    ("gpt2", "torch", 25, 1)])
def test_online_summaries_equal_numpy_over_a_full_store_with_a_resume(arch, host, int32_tokens, head_values,
                                                                     tmp_path, monkeypatch):
    """Each way the CPU folds a batch: numba's kernel (the test extra installs numba), numpy's passes,
    and the torch operations a GPU's tensors take. ``int32_tokens``: the histograms' counts widen from
    int32 to int64 after that many tokens, mid-capture; ``head_values``: the heads' norms are taken a
    token at a time (a chunk per token), not the whole batch in one chunk."""
    from streamtap.tapping import fold_kernel
    from streamtap.tapping.summarise import Summariser

    assert host != "compiled" or fold_kernel.AVAILABLE, "numba is part of the test extra"
    monkeypatch.setattr(Summariser, "HOST", host)
    if int32_tokens is not None:
        monkeypatch.setattr(Summariser, "INT32_TOKENS", int32_tokens)
    if head_values is not None:
        monkeypatch.setattr(Summariser, "HEAD_VALUES", head_values)
    model = tiny_model(arch).eval()
    texts = _corpus(model)
    direction = np.random.default_rng(1).normal(size=model.config.hidden_size)
    # the summarising capture stores only each sequence's last token, in two sessions (a resume); the
    # references are batched alike (the model's float32 values depend on the batch's shape)
    project = {"probe": direction, "tok": 7}
    opts = dict(neurons=True, positions="last", summarise=SETTINGS, project=project,
                terms=("z", "mlp_out", "neurons"))
    for name, options in (("full.zarr", dict(neurons=True)), ("proj.zarr", dict(project=project)), ("sum.zarr", opts)):
        st.capture(model, texts[:5], tmp_path / name, batch_size=3, **options)
        st.capture(model, texts, tmp_path / name, batch_size=3, resume=True, **options)
    full, proj, ds = st.open(tmp_path / "full.zarr"), st.open(tmp_path / "proj.zarr"), st.open(tmp_path / "sum.zarr")
    assert ds.sizes["token"] == len(texts)                                   # only the last tokens were stored
    res = st.analysis.summaries(ds, q=(0.0, 0.1, 0.5, 0.9, 0.99, 1.0))
    assert set(res) == {"head", "mlp", "neuron", "projection"}
    assert res["head"].attrs["tokens"] == full.sizes["token"] == sum(len(t) for t in texts)   # padding excluded
    assert res["head"].attrs["sequences"] == res["head"].attrs["committed_sequences"] == len(texts)
    assert list(res["head"].component.values[:2]) == ["L0H0", "L0H1"]
    for group in ("head", "mlp", "neuron", "projection"):
        _check_group(res[group], _offline(full, group, proj), full, group)
    # the quantile at 0 and 1 are the exact min and max
    np.testing.assert_array_equal(res["neuron"]["quantile"].sel(q=1.0).values, res["neuron"]["max"].values)


def _same(a, b, rtol=1e-12):
    """Two summaries of the same tokens: equal, but for which of several tokens tied at the k-th value
    made the cut (the values are equal there too)."""
    for g in a:
        for name in ("count", "min", "max", "top_value"):
            np.testing.assert_array_equal(a[g][name].values, b[g][name].values, err_msg=f"{g} {name}")
        above = a[g].top_value.values > a[g].top_value.values[:, -1:]
        for name in ("top_seq", "top_pos", "top_window"):
            np.testing.assert_array_equal(a[g][name].values[above], b[g][name].values[above], err_msg=f"{g} {name}")
        for name in ("mean", "var"):
            np.testing.assert_allclose(a[g][name].values, b[g][name].values, rtol=rtol, err_msg=f"{g} {name}")
        if "quantile" in a[g] or "quantile" in b[g]:   # both or neither
            np.testing.assert_array_equal(a[g]["quantile"].values, b[g]["quantile"].values)


def test_rank_stores_and_appends_merge_to_one_capture_over_both(tmp_path):
    model = tiny_model("gpt2").eval()
    texts = _corpus(model, n=8, seed=3)
    opts = dict(neurons=True, summarise=SETTINGS, batch_size=2)
    st.capture(model, texts, tmp_path / "one.zarr", **opts)
    os.makedirs(tmp_path / "ranks")
    st.capture(model, texts[:4], tmp_path / "ranks" / "rank-00000.zarr", **opts)   # batches as in one.zarr
    st.capture(model, texts[4:], tmp_path / "ranks" / "rank-00001.zarr", **opts)
    st.capture(model, texts[:4], tmp_path / "app.zarr", **opts)
    st.capture(model, texts[4:], tmp_path / "app.zarr", append=True, **opts)
    one = st.analysis.summaries(st.open(tmp_path / "one.zarr"), text=False)
    ranks = st.analysis.summaries(st.open(tmp_path / "ranks"), text=False)
    appended = st.analysis.summaries(st.open(tmp_path / "app.zarr"), text=False)
    _same(one, ranks)
    _same(one, appended)
    # written after every batch (each write merges what came since the last into the store's): the same
    st.capture(model, texts, tmp_path / "often.zarr", summarise_every=0, **opts)
    _same(one, st.analysis.summaries(st.open(tmp_path / "often.zarr"), text=False))
    assert json.loads(zarr.open_group(str(tmp_path / "often.zarr"), mode="r").attrs["summaries"])["ranges"] == [[0, 8]]
    # one summary group in the store after the append: the previous one was replaced
    root = zarr.open_group(str(tmp_path / "app.zarr"), mode="r")
    assert [n for n, _ in root.groups()] == [json.loads(root.attrs["summaries"])["group"]]


@pytest.mark.parametrize("host", ["compiled", "numpy", "torch"])
def test_neurons_without_quantiles_keep_every_other_statistic(host, tmp_path, monkeypatch):
    """``neuron_quantiles=False`` drops only the neurons' sketch: their other statistics and top contexts,
    and every other group with its quantiles, equal a default capture's (which the test above checks
    against numpy over a full store); the result says why there are no neuron quantiles; an append
    with the default settings is refused; the report still renders every group's statistics."""
    import csv

    from streamtap.analysis.summaries import NO_QUANTILES
    from streamtap.report import write_report
    from streamtap.tapping.summarise import Summariser

    monkeypatch.setattr(Summariser, "HOST", host)
    model = tiny_model("gpt2").eval()
    texts = _corpus(model, n=7, seed=4)
    opts = dict(neurons=True, batch_size=3)
    st.capture(model, texts, tmp_path / "all.zarr", summarise=SETTINGS, **opts)
    st.capture(model, texts, tmp_path / "some.zarr", summarise={**SETTINGS, "neuron_quantiles": False}, **opts)
    full = st.analysis.summaries(st.open(tmp_path / "all.zarr"), text=False)
    some = st.analysis.summaries(st.open(tmp_path / "some.zarr"), text=False)
    assert "quantile" not in some["neuron"] and some["neuron"].attrs["quantile"] == NO_QUANTILES
    assert json.loads(some["neuron"].attrs["sketch"])["neuron_quantiles"] is False
    _same({g: full[g].drop_vars("quantile") for g in full}, {g: some[g].drop_vars("quantile", errors="ignore")
                                                           for g in some})
    for g in ("head", "mlp"):
        np.testing.assert_array_equal(full[g]["quantile"].values, some[g]["quantile"].values)
    root = zarr.open_group(str(tmp_path / "some.zarr"), mode="r")
    hist = root[json.loads(root.attrs["summaries"])["group"]]["neuron_hist"]
    assert hist.shape == (some["neuron"].sizes["component"], 0)
    with pytest.raises(OptionError, match="must summarise with the same settings"):
        st.capture(model, texts[:2], tmp_path / "some.zarr", append=True, summarise=SETTINGS, **opts)
    write_report(st.open(tmp_path / "some.zarr"), tmp_path / "report")
    with open(tmp_path / "report" / "data" / "summary_stats_neuron.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == some["neuron"].sizes["component"]
    assert all(r["median"] in ("", "nan") for r in rows) and float(rows[0]["max"]) == some["neuron"]["max"].values[0]


def test_bad_summarise_options_are_refused_up_front(tmp_path):
    for bad, words in (({"top_k": 0}, "top_k=0"), ({"topk": 3}, "unknown setting 'topk'"),
                       ({"alpha": 0.7}, "alpha=0.7"), ({"window": -1}, "window=-1"), ("k3", "not name=value"),
                       (5, "expected True, False or a dict")):
        with pytest.raises(OptionError, match=words):
            st.capture(tiny_model("gpt2").eval(), [[1, 2, 3]], tmp_path / "x.zarr", summarise=bad)
        assert not (tmp_path / "x.zarr").exists()
    assert st.CaptureOptions(summarise="top_k=4,alpha=0.01").summarise == S.Settings(top_k=4, alpha=0.01)
    assert st.CaptureOptions(summarise="on").summarise == S.Settings()
    assert st.CaptureOptions(summarise="neuron_quantiles=off").summarise == S.Settings(neuron_quantiles=False)
    for bad, words in (("neuron_quantiles=2", "needs on or off"), ({"neuron_quantiles": "no"}, "True or False")):
        with pytest.raises(OptionError, match=words):
            st.CaptureOptions(summarise=bad)
    for bad in (-1, "soon", True):
        with pytest.raises(OptionError, match="summarise_every"):
            st.CaptureOptions(summarise=True, summarise_every=bad)
    assert st.CaptureOptions(summarise_every="60").summarise_every == 60.0
    # appending with other settings is refused before a batch is written
    model = tiny_model("gpt2").eval()
    st.capture(model, [[1, 2, 3]], tmp_path / "a.zarr", summarise=SETTINGS)
    with pytest.raises(OptionError, match="must summarise with the same settings"):
        st.capture(model, [[4, 5, 6]], tmp_path / "a.zarr", append=True, summarise={"top_k": 3})
    assert st.open(tmp_path / "a.zarr").sizes["token"] == 3
    st.capture(model, [[1, 2]], tmp_path / "b.zarr")
    with pytest.raises(st.StreamtapError, match="no summaries"):
        st.analysis.summaries(st.open(tmp_path / "b.zarr"))


def test_sketch_quantiles_keep_their_guarantee_on_heavy_tails():
    """The numpy sketch over a million values spanning ten decades, both signs and exact zeros."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.lognormal(0, 3, 400_000), -rng.lognormal(-2, 2, 300_000), np.zeros(1000),
                        rng.normal(0, 1e-5, 1000)])
    for alpha in (0.01, 0.02, 0.05):
        s = S.Settings(alpha=alpha)
        hist = np.bincount(S.bucket_index(x, s), minlength=s.n_buckets)[None]
        q = np.linspace(0, 1, 101)
        est = S.quantiles(hist, [x.min()], [x.max()], q, s)[0]
        exact = np.quantile(x, q, method="lower")
        inside = (np.abs(exact) >= s.low) & (np.abs(exact) <= s.high)
        assert (np.abs(est - exact)[inside] <= alpha * np.abs(exact)[inside]).all()
        assert (np.abs(est - exact)[np.abs(exact) < s.low] <= s.low).all()


def test_report_shows_each_heads_top_contexts(tmp_path):
    import html

    from streamtap.report import write_report

    model = tiny_model("gpt2").eval()
    st.capture(model, _corpus(model, n=6, seed=5), tmp_path / "s.zarr", neurons=True, summarise=SETTINGS)
    ds = st.open(tmp_path / "s.zarr")
    page = write_report(ds, tmp_path / "report").read_text(encoding="utf-8")
    res = st.analysis.summaries(ds)
    assert 'id="summaries"' in page and 'href="#summaries"' in page
    for c in range(res["head"].sizes["component"]):   # every head, its best context
        label, context = str(res["head"].component.values[c]), str(res["head"].top_text.values[c, 0])
        assert f"<td class=\"l\">{label}</td>" in page and html.escape(context) in page, label
    best = int(np.argmax(res["neuron"]["max"].values))
    assert html.escape(str(res["neuron"].top_text.values[best, 0])) in page
    assert (tmp_path / "report" / "data" / "summary_stats_neuron.csv").exists()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sink_mass_equals_the_models_attention_and_the_offline_patterns(arch, tmp_path):
    """Where patterns are captured, each head's sink mass (the probability its query puts on the
    sequence's first real token) is summarised over every real token of padded batches: equal to the
    model's own eager attention probabilities (float32) and to ``st.analysis.attention`` on the store."""
    from streamtap.attention import sequence_tokens

    model = tiny_model(arch).eval()
    texts = _corpus(model, n=7, seed=4)
    st.capture(model, texts, tmp_path / "s.zarr", patterns=True, summarise=SETTINGS, batch_size=3)
    ds = st.open(tmp_path / "s.zarr")
    res = st.analysis.summaries(ds)["sink"]
    assert list(res.component.values[:2]) == ["L0H0", "L0H1"]
    # offline: the store's patterns, key 0 of each sequence, in the store's token order
    L, H = ds.sizes["layer"], ds.sizes["head"]
    offline = np.empty((ds.sizes["token"], L * H))
    for s in range(len(texts)):
        pattern = st.analysis.attention(ds, s).isel(key=0).values            # (layer, head, query)
        offline[sequence_tokens(ds, s)] = pattern.transpose(2, 0, 1).reshape(-1, L * H)
    _check_group(res, offline, ds, "sink")
    # the model's own probabilities, each sequence alone and unpadded
    model_side = []
    for t in texts:
        with torch.no_grad():
            att = model(torch.tensor([t]), output_attentions=True).attentions
        model_side.append(np.stack([a[0, :, :, 0].double().numpy().T for a in att], axis=1).reshape(len(t), -1))
    x = np.concatenate(model_side)
    assert (res["count"].values == x.shape[0]).all()
    for name, ref in (("mean", x.mean(0)), ("var", x.var(0)), ("min", x.min(0)), ("max", x.max(0))):
        np.testing.assert_allclose(res[name].values, ref, rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(res.top_value.values, -np.sort(-x, axis=0)[:SETTINGS["top_k"]].T, rtol=0, atol=1e-6)


def _padded(rows):
    """(input_ids, attention_mask) of token-id lists, padded on the right with PAD."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    return ids, (ids != PAD).long()


def test_an_append_summarises_again_what_a_crash_left_unsummarised(tmp_path, monkeypatch):
    """A store whose summaries lag its commits (a capture stopped between a commit and its summary write):
    st.tap(append=True, summarise=...) first summarises the committed sequences no summary covers, from the
    token ids the store holds, so the result equals one capture of every batch; a store that keeps only some
    positions cannot, and is refused by name with nothing written."""
    from streamtap.io import summaries as S
    from streamtap.tapping.batch import Recorder

    model = tiny_model("llama").eval()
    texts = _corpus(model, n=9, seed=5)
    parts = [_padded(texts[:3]), _padded(texts[3:6]), _padded(texts[6:])]

    def tap(path, batches, **options):
        with st.tap(model, tmp_path / path, summarise=SETTINGS, **options), torch.no_grad():
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask)

    tap("one.zarr", parts)
    for path, options in (("lag.zarr", {}), ("last.zarr", {"positions": "last"})):
        tap(path, parts[:1], **options)
        with monkeypatch.context() as m:       # the second session's summaries never reach the store
            m.setattr(Recorder, "write_summaries", lambda self, root=None: None)
            tap(path, parts[1:2], append=True, **options)
        meta = S.meta_of(zarr.open_group(str(tmp_path / path), mode="r").attrs)
        assert S.uncovered(meta, 6) == [3, 4, 5]
    tap("lag.zarr", parts[2:], append=True)
    one = st.analysis.summaries(st.open(tmp_path / "one.zarr"), text=False)
    got = st.analysis.summaries(st.open(tmp_path / "lag.zarr"), text=False)
    _same(one, got)
    assert got["head"].attrs["sequences"] == got["head"].attrs["committed_sequences"] == 9
    before = st.open(tmp_path / "last.zarr").sizes["token"]
    with pytest.raises(st.InputError, match="resume=True"):
        tap("last.zarr", parts[2:], append=True, positions="last")
    assert st.open(tmp_path / "last.zarr").sizes["token"] == before


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sink_mass_covers_every_token_model_generate_feeds(arch, tmp_path):
    """Inside model.generate a decoding step's forward holds only the new token (its keys are in the KV
    cache); the tap keeps the sequence's terms since the prompt, so each step's query gets its sink mass
    too: equal to the model's own eager attention probabilities in that very call (left padding included)
    on the sequence's first real token, for every stored token."""
    model = tiny_model(arch).eval()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = PAD, 0                                      # a left-padded prompt
    with st.tap(model, tmp_path / "g.zarr", patterns=True, summarise=SETTINGS), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             pad_token_id=PAD, output_attentions=True, return_dict_in_generate=True)
    ds = st.open(tmp_path / "g.zarr")
    res = st.analysis.summaries(ds)["sink"]
    # the model's own: step 0 holds the prompt's queries, step k the query of column width + k - 1
    width, pads = ids.shape[1], (mask == 0).sum(1).tolist()
    model_side = {}
    for k, step in enumerate(out.attentions):
        for row in range(ids.shape[0]):
            columns = range(pads[row], width) if k == 0 else [width + k - 1]
            for col in columns:
                q = col if k == 0 else 0
                model_side[(row, col - pads[row])] = np.concatenate(
                    [a[row, :, q, pads[row]].double().numpy() for a in step])   # (layer * head,)
    x = np.stack([model_side[(int(s), int(p))] for s, p in zip(ds.seq.values, ds.pos.values)])
    assert x.shape[0] == ds.sizes["token"] > 4 + 6
    assert (res["count"].values == x.shape[0]).all()
    for name, ref in (("mean", x.mean(0)), ("var", x.var(0)), ("min", x.min(0)), ("max", x.max(0))):
        np.testing.assert_allclose(res[name].values, ref, rtol=0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(res.top_value.values, -np.sort(-x, axis=0)[:SETTINGS["top_k"]].T, rtol=0, atol=1e-6)


def test_a_bfloat16_model_s_summaries_are_the_same_whichever_way_the_cpu_folds_them(tmp_path, monkeypatch):
    """The compiled fold widens bfloat16 a chunk at a time; numpy's and torch's folds widen it their way."""
    from streamtap.tapping.summarise import Summariser

    model = tiny_model("llama", dtype="bfloat16").eval()
    texts = _corpus(model)
    got = {}
    for host in ("compiled", "numpy", "torch"):
        monkeypatch.setattr(Summariser, "HOST", host)
        st.capture(model, texts, tmp_path / f"{host}.zarr", batch_size=3, neurons=True, positions="last",
                   summarise=SETTINGS)
        got[host] = st.analysis.summaries(st.open(tmp_path / f"{host}.zarr"), q=(0.1, 0.5, 0.9))
    for host in ("numpy", "torch"):
        _same(got["compiled"], got[host], rtol=1e-12)
