"""The figures render (real matplotlib, Agg) from the analyses' results."""

import numpy as np

import streamtap as st
from streamtap.report import figures

from _analysis_util import tap_forward

PNG = b"\x89PNG\r\n\x1a\n"


def test_every_figure_renders():
    t = tap_forward("llama")
    ds = t.ds
    text = lambda ids: st.analysis.vocab_text(ds, ids)  # noqa: E731
    made = {
        "heatmap": figures.contribution_heatmap(st.analysis.direct_logit_attribution(ds.isel(token=3), 5)),
        "lens": figures.logit_lens_table(st.analysis.logit_lens(ds.isel(token=3), k=4), text),
        "relevance": figures.token_maps(st.analysis.relevance(ds, [5, 9, 17]), n=4),
        "promotion": figures.token_maps(st.analysis.promotion(ds, [5, 9, 17]), [(0, 1), (1, 2)]),
        "ranks": figures.effective_rank_bars(st.analysis.effective_rank(ds)),
        "norms": figures.message_norm_distribution(st.analysis.empty_messages(ds), threshold=0.3),
    }
    for name, fig in made.items():
        png = figures.png_bytes(fig, dpi=50)
        assert png.startswith(PNG) and len(png) > 2000, name
        assert fig.axes, name
    heat = made["heatmap"].axes[0].images[0].get_array()
    contrib = st.analysis.direct_logit_attribution(ds.isel(token=3), 5).compute()
    assert np.isclose(heat[1, 3], float(contrib.sel(component="L1H3")))
    assert len(made["relevance"].axes) == 4 + 1                   # four heads and a colour bar


def test_pattern_figures_draw_the_analyses_numbers():
    """Attention heatmaps, the head-score grid, the logit-lens grid and the residual scree: each draws the
    numbers of the analysis it is given, with nothing cut off."""
    t = tap_forward("llama", patterns=True)
    ds = t.ds
    text = lambda ids: st.analysis.vocab_text(ds, ids)  # noqa: E731

    att = st.analysis.attention(ds, 0)
    heat = figures.attention_heatmap(att, [(1, 2), (0, 3)], notes={(1, 2): "why it is shown"})
    shown = heat.axes[0].images[0].get_array()
    assert np.allclose(np.ma.getdata(shown), att.sel(layer=1, head=2).values)
    assert (np.ma.getmaskarray(shown) == (att.sel(layer=1, head=2).values == 0)).all()   # grey: not visible
    assert np.triu(np.ma.getmaskarray(shown), 1)[np.triu_indices(shown.shape[0], 1)].all()  # causal
    assert heat.axes[0].get_title() == "L1H2\nwhy it is shown" and heat.axes[1].get_title() == "L0H3"
    assert len(heat.axes) == 2 + 1

    scores = st.analysis.head_scores(ds)
    grid = figures.head_score_grid(scores)
    for ax, name in zip(grid.axes, ("sink_mass", "previous_token", "induction")):
        assert np.allclose(ax.images[0].get_array(), scores[name].values), name

    rows = np.flatnonzero(ds.seq.values == 0)
    ids = ds.token_id.values[rows]
    targets = np.append(ids[1:], ids[-1])
    lens = st.analysis.logit_lens(ds.isel(token=rows), k=2, target=targets).compute()
    for color, var in (("top", lens.top_prob.isel(k=0)), ("target", lens.target_prob)):
        fig = figures.logit_lens_grid(lens, text, targets=targets, color=color)
        ax = fig.axes[0]
        assert np.allclose(ax.images[0].get_array(), var.values.T), color      # (depth, position)
        assert len(ax.texts) == lens.sizes["token"] * lens.sizes["depth"]
        top = text(lens.top_id.values[:, :, 0])
        assert ax.texts[0].get_text() == top[0, 0] and ax.texts[-1].get_text() == top[-1, -1]
        bold = [t.get_fontweight() == "bold" for t in ax.texts]
        assert bold == list((lens.target_rank.values.T == 0).reshape(-1))
        assert figures.overflowing_text(fig) == []

    stack = st.analysis.residual_stream(ds, depths=[(1, "attn"), (2, "final")]).compute()
    pca = figures.residual_pca(stack, n_components=5)
    first = ds.pos.values == 0
    for d in range(2):
        for group, keep in (("all", np.ones_like(first)), ("rest", ~first)):
            x = stack.values[keep, d].astype(np.float64)
            eig = np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1]                # independent: covariance spectrum
            assert np.allclose(pca.explained_variance_ratio.isel(depth=d).sel(group=group), eig[:5] / eig.sum())
    assert pca.attrs["first_tokens"] == 3 and pca.attrs["tokens"] == ds.sizes["token"]
    scree = figures.residual_pca_scree(pca)
    assert np.allclose(scree.axes[0].lines[0].get_ydata(), pca.explained_variance_ratio.isel(depth=0).sel(group="all"))
    assert np.allclose(scree.axes[1].lines[1].get_ydata(), pca.explained_variance_ratio.isel(depth=1).sel(group="rest"))

    for name, fig in (("heat", heat), ("grid", grid), ("scree", scree)):
        assert figures.png_bytes(fig, dpi=50).startswith(PNG), name
        assert figures.overflowing_text(fig) == [], name


def test_attention_heatmap_thins_the_labels_of_a_long_sequence():
    t = tap_forward("llama", patterns=True, lengths=[50])
    att = st.analysis.attention(t.ds, 0, layers=[1], heads=[0])
    fig = figures.attention_heatmap(att, max_labels=12)
    ax = fig.axes[0]
    assert 0 < len(ax.get_xticks()) <= 12 and 0 < len(ax.get_yticks()) <= 12
    assert ax.get_xticks()[0] == 0                                      # the first token is always labelled
    assert figures.overflowing_text(fig) == []
