"""The HTML report: written from a store alone, from the command line; with attention patterns and without.
(Rendered by a real headless Chromium: tests/slow/test_report_chromium.py.)"""

import csv
import re

import numpy as np
import pytest
from click.testing import CliRunner

import streamtap as st
from streamtap.cli import cli
from streamtap.report import write_report

from _util import report_store

FUNCTION_WORDS = {"the", "and", "of", "is", "in"}   # the function words of REPORT_TEXTS


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return report_store(tmp_path_factory.mktemp("report") / "run.zarr")


@pytest.fixture(scope="module")
def patterns_store(tmp_path_factory):
    return report_store(tmp_path_factory.mktemp("report") / "patterns.zarr", patterns=True)


def _csv(out, name) -> list[dict]:
    with open(out / "data" / f"{name}.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_report_from_the_command_line(store, tmp_path):
    path, _ = store
    out = tmp_path / "cli"
    result = CliRunner().invoke(cli, ["report", str(path), "--out", str(out), "--words", "the,king,queen"])
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    # the store alone carries every weight the report needs (W_Q, W_K, W_V, W_E included); only the patterns
    # section is missing, in one line that names the fix
    assert page.count("Not available") == 1 and "W_Q" in page
    assert re.search(r'class="missing">Not available for this store: this store was captured without patterns: '
                     r'capture with --patterns', page)
    assert page.count("<img ") == 8                     # no score grid, no heatmaps
    assert re.findall(r'data-overflow="([^"]*)"', page) == [""] * 8
    for name in ("store", "attribution_top", "logit_lens", "logit_lens_grid", "empty_heads", "residual_pca",
                 "accumulation"):
        assert (out / "data" / f"{name}.csv").exists(), name
    assert not (out / "data" / "head_scores.csv").exists()
    assert list(_csv(out, "relevance_raw")[0])[2:] == ["'the'", "'king'", "'queen'"]   # the words asked for


def test_report_with_patterns_shows_the_analyses_numbers_and_informative_defaults(patterns_store, tmp_path):
    path, _ = patterns_store
    ds = st.open(path)
    out = tmp_path / "patterns"
    page = write_report(ds, out).read_text()
    assert "Not available" not in page
    assert page.count("<img ") == 10
    assert re.findall(r'data-overflow="([^"]*)"', page) == [""] * 10
    for heading in ("Attention patterns", "Residual PCA", "logit lens grid", "head score grid", "attention heatmaps"):
        assert heading in page

    # the attributed token: by default one whose predicted next token is a content word, and the page says why
    row = int(re.search(r"store row ([\d,]+)", page).group(1).replace(",", ""))
    assert "whose predicted next token is a word" in page
    one = ds.isel(token=[row])
    target = int(st.analysis.logit_lens(one, k=1, sites=()).top_id.values[0, -1, 0])
    assert st.analysis.vocab_text(ds, [target])[0] not in FUNCTION_WORDS

    # the score grid's numbers are head_scores' own (every sequence of this store is scored)
    scores = st.analysis.head_scores(ds).compute()
    for r in _csv(out, "head_scores"):
        one_head = scores.sel(layer=int(r["layer"]), head=int(r["head"]))
        for name in ("sink_mass", "previous_token", "induction", "off"):
            assert np.isclose(float(r[name]), float(one_head[name]), rtol=1e-9, atol=1e-12), (r, name)

    # the heatmaps: the three heads with the largest direct contribution to the prediction, and the strongest
    # previous-token head, with the pattern attention() gives
    contrib = st.analysis.direct_logit_attribution(one, target).isel(token=0).compute()
    heads = contrib.where(contrib.kind == "head", drop=True)
    top = [str(c) for c in heads.component.values[np.argsort(-np.abs(heads.values))[:3]]]
    flat = scores.previous_token.stack(h=("layer", "head"))
    best = int(np.argmax(flat.values))
    prev = f"L{int(flat.layer.values[best])}H{int(flat['head'].values[best])}"
    shown = _csv(out, "attention_patterns")
    assert set(top + [prev]) <= {r["head"] for r in shown}
    seq = int(ds.seq.values[row])
    att = st.analysis.attention(ds, seq).compute()
    for r in shown[::7]:
        layer, head = map(int, r["head"][1:].split("H"))
        assert np.isclose(float(r["probability"]), float(att.sel(layer=layer, head=head)
                                                         .isel(query=int(r["query pos"]), key=int(r["key pos"]))))

    # default words of the maps: the prediction and content words of its passage, no function word
    words = [w.strip("'") for w in list(_csv(out, "relevance_raw")[0])[2:]]
    assert words and words[0] == st.analysis.vocab_text(ds, [target])[0]
    assert not set(words) & FUNCTION_WORDS
    # ... for the heads that contribute most to the prediction
    assert [r["head"] for r in _csv(out, "relevance_raw")][::len(words)][:3] == top

    # the logit-lens grid is logit_lens over the passage, scored against the next token
    grid = _csv(out, "logit_lens_grid")
    rows = np.flatnonzero(ds.seq.values == seq)
    ids = ds.token_id.values[rows]
    lens = st.analysis.logit_lens(ds.isel(token=rows[:-1]), k=1, target=ids[1:]).compute()
    final = [r for r in grid if r["depth"] == "final"]
    assert len(final) == min(14, int(ds.pos.values[row]) + 1)
    for r in final[:-1]:
        assert np.isclose(float(r["next prob"]), float(lens.target_prob.isel(token=int(r["pos"]), depth=-1)), rtol=1e-5)


def test_report_on_a_long_sequence_without_token_text(tmp_path):
    """A store captured without a tokenizer (no token text) and a sequence longer than the heatmaps show: the
    heatmaps crop to the last queries up to the attributed token and keep the first token as a key; the maps'
    words fall back to the most frequent tokens, and the page says so."""
    from _analysis_util import tap_forward

    ds = tap_forward("llama", patterns=True, lengths=[50, 12]).ds
    out = tmp_path / "long"
    page = write_report(ds, out, token=45).read_text()
    assert page.count("<img ") == 10
    assert re.findall(r'data-overflow="([^"]*)"', page) == [""] * 10
    assert "the last 40 queries up to the attributed token, with the first token kept as a key" in page
    assert "the sample&#x27;s most frequent tokens: without token text" in page
    shown = _csv(out, "attention_patterns")
    assert {int(r["query pos"]) for r in shown} == set(range(6, 46))
    assert {int(r["key pos"]) for r in shown} <= {0, *range(6, 46)} and any(r["key pos"] == "0" for r in shown)
    assert len({r["pos"] for r in _csv(out, "logit_lens_grid")}) == 14          # the passage's last 14 tokens
