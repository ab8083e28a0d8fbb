"""The attribution graph's page rendered by a real headless Chromium (a child process): it loads with nothing
fetched from outside, draws one circle per node of the graph, and a click on a node (dispatched by the page
itself for ``graph.html#NODE``) lists that node's inputs, which sum to its value."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import zarr

import streamtap as st
from streamtap.models import tiny_model
from streamtap.report.graph_page import write_graph

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)


def _dom(url: str, tmp_path) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
           "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0", "--dump-dom", url]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Uncaught" not in run.stderr, run.stderr[-2000:]
    return run.stdout


def test_graph_page_renders_and_a_click_shows_the_inputs(tmp_path):
    if CHROMIUM is None:  # a missing browser is a broken set-up, not a reason to pass quietly
        pytest.fail("Chromium is not installed: scripts/setup-env.sh installs it as root (Debian: apt-get install -y chromium)")
    model = tiny_model("llama")
    store = zarr.storage.MemoryStore()
    with st.tap(model, store, patterns=True, neurons=True), torch.no_grad():
        model(input_ids=torch.tensor([[5, 9, 3, 7, 5, 9, 3, 2]]))
    g = st.analysis.attribution_graph(st.open(store), 0, 7, depth=3, max_inputs=6, dtype=np.float64)
    page = write_graph(g, tmp_path / "out")
    dom = _dom(page.resolve().as_uri(), tmp_path)
    assert len(re.findall(r'<circle[^>]*class="node', dom)) == len(g.nodes)
    assert f'<span id="count">{len(g.nodes)}</span>' in dom
    head = g.nodes[(g.nodes.kind == "head") & g.nodes.expanded].node_id.iloc[0]
    clicked = _dom(page.resolve().as_uri() + "#" + head, tmp_path)
    inputs = g.inputs(head)
    panel = clicked.split('<div id="panel">', 1)[1].split("<script", 1)[0]     # the page's script holds the template
    assert len(re.findall(r'<tr class="input">', panel)) == len(inputs)
    assert 'class="node sel"' in clicked and 'id="qk"' in panel
    shown = float(re.search(r'<b id="sel-sum">([^<]+)</b>', panel).group(1))
    assert shown == pytest.approx(inputs.weight.sum(), rel=1e-4)
    assert shown == pytest.approx(float(g.nodes.set_index("node_id").value[head]), rel=1e-4, abs=1e-6)
