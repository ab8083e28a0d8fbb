"""A self-contained interactive HTML view of an attribution graph (no network: inline SVG, JS and CSS).

Nodes are placed by layer (rows, the root on top, embeddings at the bottom) and position (columns);
hovering a node shows its token text and value, clicking it lists its exact inputs (which sum to its
value) and, for a head, its QK edges. ``graph.html#NODE_ID`` opens with that node clicked.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222}
#wrap{display:flex;gap:16px;align-items:flex-start}
svg{border:1px solid #ddd;background:#fcfcfc}
.node{cursor:pointer;stroke:#333;stroke-width:.5}
.node.sel{stroke:#000;stroke-width:2.5}
.edge{fill:none;stroke-opacity:.45}
#panel{min-width:360px;max-width:480px;font-size:13px}
#panel table{border-collapse:collapse;width:100%}
#panel td,#panel th{border-bottom:1px solid #eee;padding:2px 6px;text-align:left}
#tip{position:fixed;pointer-events:none;background:#fff;border:1px solid #999;padding:3px 6px;font-size:12px;display:none}
.pos{font-size:10px;fill:#555}
"""

_JS = r"""
const G = JSON.parse(document.getElementById('graph-data').textContent);
const svg = document.getElementById('graph');
const NS = 'http://www.w3.org/2000/svg';
const byId = {};
G.nodes.forEach(n => byId[n.id] = n);
const rows = [...new Set(G.nodes.map(n => n.row))].sort((a, b) => b - a);
const W = 70, Hh = 60, X0 = 60, Y0 = 30;
const width = X0 + (G.n_positions + 1) * W, height = Y0 + rows.length * Hh + 30;
svg.setAttribute('width', width); svg.setAttribute('height', height);
const slot = {};
G.nodes.forEach(n => {
  const key = n.row + ':' + n.position;
  const k = (slot[key] = (slot[key] || 0) + 1) - 1;
  n.x = X0 + n.position * W + (k % 5) * 11;
  n.y = Y0 + rows.indexOf(n.row) * Hh + Math.floor(k / 5) * 11;
});
const maxW = Math.max(...G.edges.map(e => Math.abs(e.weight)), 1e-12);
G.edges.forEach(e => {
  const s = byId[e.source], t = byId[e.target];
  if (!s || !t) return;
  const p = document.createElementNS(NS, 'path');
  p.setAttribute('d', `M${s.x},${s.y} C${s.x},${(s.y + t.y) / 2} ${t.x},${(s.y + t.y) / 2} ${t.x},${t.y}`);
  p.setAttribute('class', 'edge');
  p.setAttribute('stroke', e.weight >= 0 ? '#1f77b4' : '#d62728');
  p.setAttribute('stroke-width', 0.5 + 4 * Math.abs(e.weight) / maxW);
  svg.appendChild(p);
});
G.tokens.forEach((t, i) => {
  const tx = document.createElementNS(NS, 'text');
  tx.setAttribute('x', X0 + i * W); tx.setAttribute('y', height - 8); tx.setAttribute('class', 'pos');
  tx.textContent = i + ' ' + JSON.stringify(t); svg.appendChild(tx);
});
const colors = {logit: '#000', head: '#ff7f0e', mlp: '#2ca02c', neuron: '#98df8a', embed: '#9467bd', rest: '#bbb'};
const tip = document.getElementById('tip');
G.nodes.forEach(n => {
  const c = document.createElementNS(NS, 'circle');
  c.setAttribute('cx', n.x); c.setAttribute('cy', n.y); c.setAttribute('r', n.expanded ? 6 : 4);
  c.setAttribute('fill', colors[n.kind] || '#8c564b');
  c.setAttribute('class', 'node'); c.setAttribute('id', 'n-' + n.id); c.dataset.node = n.id;
  c.addEventListener('mousemove', ev => {
    tip.style.display = 'block'; tip.style.left = (ev.clientX + 12) + 'px'; tip.style.top = (ev.clientY + 12) + 'px';
    tip.textContent = `${n.label} at ${n.position} ${JSON.stringify(G.tokens[n.position])}: ${n.value.toPrecision(5)}`;
  });
  c.addEventListener('mouseleave', () => tip.style.display = 'none');
  c.addEventListener('click', () => show(n.id));
  svg.appendChild(c);
});
function fmt(x) { return Number(x).toPrecision(5); }
function esc(s) { return String(s).replace(/[&<>"]/g, ch => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[ch])); }
function show(id) {
  document.querySelectorAll('.node.sel').forEach(e => e.classList.remove('sel'));
  const el = document.getElementById('n-' + id); if (el) el.classList.add('sel');
  const n = byId[id];
  const ins = G.edges.filter(e => e.target === id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
  const total = ins.reduce((s, e) => s + e.weight, 0);
  let h = `<h3 id="sel-title">${esc(n.label)} at position ${n.position} (${esc(JSON.stringify(G.tokens[n.position]))})</h3>`;
  h += `<p>value <b>${fmt(n.value)}</b>; ${ins.length} inputs summing to <b id="sel-sum">${fmt(total)}</b></p>`;
  h += '<table id="inputs"><tr><th>input</th><th>pos</th><th>token</th><th>weight</th><th>edge</th></tr>';
  ins.forEach(e => { const s = byId[e.source] || {label: e.source, position: ''};
    h += `<tr class="input"><td>${esc(s.label)}</td><td>${s.position}</td><td>${esc(JSON.stringify(G.tokens[s.position] ?? ''))}</td><td>${fmt(e.weight)}</td><td>${e.kind}</td></tr>`; });
  h += '</table>';
  const qk = G.qk.filter(r => r.head_node === id);
  if (qk.length) {
    h += `<h4>QK: why it attended (score ${fmt(qk[0].score)})</h4><table id="qk"><tr><th>part</th><th>query term</th><th>key term</th><th>value</th></tr>`;
    qk.forEach(r => { h += `<tr><td>${r.part}</td><td>${esc(r.query_term ?? '')}${r.query_term ? '@' + r.query_pos : ''}</td><td>${esc(r.key_term ?? '')}${r.key_term ? '@' + r.key_pos : ''}</td><td>${fmt(r.value)}</td></tr>`; });
    h += '</table>';
  }
  document.getElementById('panel').innerHTML = h;
}
document.getElementById('count').textContent = G.nodes.length;
if (location.hash.length > 1) { const el = document.getElementById('n-' + decodeURIComponent(location.hash.slice(1)));
  if (el) el.dispatchEvent(new MouseEvent('click', {bubbles: true})); }
"""


def _row(kind: str, layer: int, n_layers: int) -> float:
    """Vertical order: the root on top, then each layer's MLP and neurons above its heads, embeddings last."""
    if kind == "logit":
        return n_layers + 1
    if layer < 0:
        return -1
    return layer + {"mlp": 0.6, "neuron": 0.3, "head": 0.0}.get(kind, 0.0)


def graph_html(graph) -> str:
    """The page for one ``AttributionGraph``, as a string (everything inline)."""
    n_layers = int(graph.attrs["n_layers"])
    nodes = []
    for r in graph.nodes.itertuples():
        nodes.append({"id": r.node_id, "label": r.label, "kind": r.kind, "layer": int(r.layer),
                      "position": int(r.position), "value": float(r.value), "expanded": bool(r.expanded),
                      "row": _row(r.kind, int(r.layer), n_layers)})
    edges = [{"source": r.source, "target": r.target, "weight": float(r.weight), "kind": r.kind}
             for r in graph.edges.itertuples()]
    qk = json.loads(graph.qk.to_json(orient="records"))
    data = {"nodes": nodes, "edges": edges, "qk": qk, "tokens": [str(t) for t in graph.prompt_tokens],
            "n_positions": len(graph.prompt_tokens)}
    payload = json.dumps(data).replace("</", "<\\/")
    title = html.escape(f"{graph.attrs['target_label']} at position {graph.attrs['position']}")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>streamtap graph: {title}</title>
<style>{_CSS}</style></head><body>
<h2>Attribution graph: {title} = {graph.attrs['value']:.6g}</h2>
<p><span id="count"></span> nodes. Rows: layers (root on top, embeddings at the bottom); columns: positions.
Hover a node for its token and value; click it for its exact inputs (they sum to its value; patterns, norm
scales and neuron gains frozen). Blue edges add, red subtract.</p>
<div id="wrap"><svg id="graph" xmlns="http://www.w3.org/2000/svg"></svg><div id="panel"><p>Click a node.</p></div></div>
<div id="tip"></div>
<script type="application/json" id="graph-data">{payload}</script>
<script>{_JS}</script></body></html>"""


def write_graph(graph, out) -> Path:
    """Write ``out/graph.html`` (the view), ``out/graph.json`` (Neuronpedia format) and the node and edge
    tables as CSV; returns the page's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page = out / "graph.html"
    page.write_text(graph_html(graph), encoding="utf-8")
    graph.save_json(out / "graph.json")
    graph.nodes.to_csv(out / "nodes.csv", index=False)
    graph.edges.to_csv(out / "edges.csv", index=False)
    graph.qk.to_csv(out / "qk.csv", index=False)
    return page


__all__ = ["graph_html", "write_graph"]
