"""``st.analysis.attribution_graph``: the root is the model's own logit, every expanded node's inputs sum to its
value, the JSON export validates against Neuronpedia's published graph schema (vendored in tests/data), the
``streamtap graph`` command writes the page and the JSON, and bad input gets one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import zarr

import streamtap as st
from streamtap.errors import PatternsMissingError, StreamtapError
from streamtap.models import tiny_model

from _cli_util import invoke

SCHEMA = Path(__file__).parent.parent / "data" / "neuronpedia-graph-schema.json"
IDS = [[5, 9, 3, 7, 5, 9, 3, 2], [4, 8, 1, 0, 0, 0, 0, 0]]


def tapped(arch: str, store=None, **options):
    model = tiny_model(arch)
    ids = torch.tensor(IDS)
    mask = torch.tensor([[1] * 8, [1] * 3 + [0] * 5])
    store = zarr.storage.MemoryStore() if store is None else store
    with st.tap(model, store, **options), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits.double().numpy(), store


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen3"])
def graph_case(request):
    logits, store = tapped(request.param, patterns=True, neurons=True)
    ds = st.open(store)
    g = st.analysis.attribution_graph(ds, 0, 7, foil=3, position=-1, depth=3, max_inputs=6, dtype=np.float64)
    return request.param, logits, ds, g


def test_root_is_the_models_logit_difference(graph_case):
    _, logits, ds, g = graph_case
    assert g.attrs["value"] == pytest.approx(logits[0, -1, 7] - logits[0, -1, 3], rel=1e-5, abs=1e-6)
    assert g.nodes.kind.iloc[0] == "logit"


def test_every_expanded_node_s_inputs_sum_to_its_value(graph_case):
    arch, _, ds, g = graph_case
    sums = g.edges.groupby("target").weight.sum()
    expanded = g.nodes[g.nodes.expanded & (g.nodes.kind != "mlp") | (g.nodes.kind == "logit")].set_index("node_id").value
    mlps = g.nodes[(g.nodes.kind == "mlp") & g.nodes.node_id.isin(sums.index)].set_index("node_id").value
    values = np.concatenate([expanded.values, mlps.values])
    got = np.concatenate([sums.reindex(expanded.index).values, sums.reindex(mlps.index).values])
    scale = max(abs(g.attrs["value"]), 1.0)
    assert np.abs(got - values).max() <= 10 * st.tolerance(ds) * scale, arch
    # the graph went through all three edge kinds, and pruning left explicit rest inputs
    assert {"direct", "ov", "neuron", "mlp_in", "rest"} <= set(g.edges.kind)
    assert {"head", "mlp", "neuron", "logit"} <= set(g.nodes.kind)
    assert len(g.qk) and set(g.qk.part) >= {"pair", "query", "key"}
    # the QK rows of each head sum, pairs aside, to its score's marginals
    one = g.qk[g.qk.head_node == g.qk.head_node.iloc[0]]
    assert one.score.nunique() == 1


def test_node_values_are_exact_shares_of_the_root(graph_case):
    """The root's direct inputs are exactly direct logit attribution's contributions at that token."""
    _, _, ds, g = graph_case
    dla = st.analysis.direct_logit_attribution(ds.isel(token=7), 7, foil=3, dtype=np.float64).compute()
    direct = g.edges[(g.edges.kind == "direct")]
    labels = g.nodes.set_index("node_id").label
    for r in direct.itertuples():
        name = labels[r.source]
        if name in dla.component.values:
            assert r.weight == pytest.approx(float(dla.sel(component=name)), rel=1e-6, abs=1e-9)


def test_json_export_validates_against_the_neuronpedia_schema(graph_case, tmp_path):
    _, _, _, g = graph_case
    data = g.to_json(slug="tiny")
    jsonschema.validate(data, json.loads(SCHEMA.read_text()))
    assert len(data["nodes"]) == len(g.nodes) and len(data["links"]) == len(g.edges)
    assert any("qk_tracing_results" in n for n in data["nodes"])
    assert "neuronpedia" in data["metadata"]["info"]["source_urls"][0]
    g.to_xarray()


def test_cli_writes_page_json_and_tables(tmp_path):
    _, _ = tapped("llama", store=str(tmp_path / "s.zarr"), patterns=True, neurons=True)
    result = invoke("graph", tmp_path / "s.zarr", "--seq", 0, "--target", 7, "--out", tmp_path / "g")
    assert result.exit_code == 0, result.output
    for name in ("graph.html", "graph.json", "nodes.csv", "edges.csv", "qk.csv"):
        assert (tmp_path / "g" / name).is_file()
    page = (tmp_path / "g" / "graph.html").read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page


def test_bad_input(tmp_path):
    _, store = tapped("llama", patterns=True)
    ds = st.open(store)
    with pytest.raises(StreamtapError, match="position 8 is out of range"):
        st.analysis.attribution_graph(ds, 0, 7, position=8)
    with pytest.raises(StreamtapError, match="sequence 4 is not in the store"):
        st.analysis.attribution_graph(ds, 4, 7)
    with pytest.raises(StreamtapError, match="target id 999 is outside the vocabulary"):
        st.analysis.attribution_graph(ds, 0, 999)

    class Tok:   # a tokenizer that splits the word: the error shows how
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [11, 12]}

        def decode(self, ids):
            return {11: " Par", 12: "is"}[ids[0]]

    with pytest.raises(StreamtapError, match=r"tokenizes as \[' Par', 'is'\] \(ids \[11, 12\]\)"):
        st.analysis.attribution_graph(ds, 0, " Paris", tokenizer=Tok())
    _, plain = tapped("llama", store=str(tmp_path / "plain.zarr"))
    with pytest.raises(PatternsMissingError, match="--patterns"):
        st.analysis.attribution_graph(st.open(plain), 0, 7)
    result = invoke("graph", tmp_path / "plain.zarr", "--seq", 0, "--target", 7, "--out", tmp_path / "nothing")
    assert result.exit_code == 2 and "--patterns" in result.output
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(StreamtapError, match="give a target token"):
        st.analysis.attribution_graph(ds, 0)


def post_norm_root(arch: str, ds, logits):
    """(graph, the model's own value of its root): a logit where the store has the unembedding (Gemma-2's
    soft-cap applied to the graph's pre-cap root), else a direction read off the model's own output:
    OPT-350m-style's logit through its project_out and LM head, BERT's last hidden state."""
    kw = dict(position=-1, depth=3, max_inputs=6, dtype=np.float64)
    if "W_U" in ds:
        g = st.analysis.attribution_graph(ds, 0, 7, **kw)
        cap = ds.attrs.get("final_logit_softcap")
        return g, (cap * np.tanh(g.attrs["value"] / cap) if cap else g.attrs["value"]), logits[0, -1, 7]
    model = tiny_model(arch)
    with torch.no_grad():
        if getattr(model.config, "do_layer_norm_before", True) is False:   # OPT post-LN: logit = W_U P h
            u = model.get_output_embeddings().weight[7] @ model.model.decoder.project_out.weight
            g = st.analysis.attribution_graph(ds, 0, direction=u.double().numpy(), **kw)
            return g, g.attrs["value"], logits[0, -1, 7]
        u = torch.linspace(-1.0, 1.0, model.config.hidden_size)
        hidden = model(input_ids=torch.tensor(IDS[:1]), output_hidden_states=True).hidden_states[-1][0, -1]
        g = st.analysis.attribution_graph(ds, 0, direction=u.double().numpy(), **kw)
        return g, g.attrs["value"], float(hidden.double() @ u.double())


@pytest.mark.parametrize("arch", ["gemma2", "olmo2", "opt-post-ln", "bert"])
def test_graphs_on_streams_with_norms_inside(arch):
    """Post-sublayer norms (Gemma-2's sandwich, OLMo-2) and post-LN blocks (OPT-350m-style, BERT): with every
    norm's scale frozen a child's direction is carried back through the norms between its write and its
    reader, so the root is the model's own number and every expanded node's inputs sum to its value."""
    logits, store = tapped(arch, patterns=True, neurons=True)
    ds = st.open(store)
    g, root, reference = post_norm_root(arch, ds, logits)
    assert root == pytest.approx(reference, rel=1e-5, abs=1e-5)
    sums = g.edges.groupby("target").weight.sum()
    values = g.nodes.set_index("node_id").value.reindex(sums.index)
    assert np.abs(sums - values).max() <= 10 * st.tolerance(ds) * max(abs(g.attrs["value"]), 1.0), arch
    assert {"head", "mlp", "neuron"} <= set(g.nodes[g.nodes.expanded].kind)
    assert {"ov", "neuron", "mlp_in"} <= set(g.edges.kind)
    betas = g.nodes[g.nodes.kind == "norm_beta"]
    assert betas.empty or not betas.expanded.any()   # norm betas are leaves
