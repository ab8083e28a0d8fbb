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
