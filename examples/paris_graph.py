"""The exact attribution graph behind SmolLM2's " Paris" after "The capital of France is", from a store.

    python examples/paris_graph.py [--out DIR] [--depth 3] [--max-inputs 6]

Taps one forward of the prompt with ``patterns=True`` and ``neurons=True``, then, from the store alone,
``st.analysis.attribution_graph`` walks back from the " Paris" logit at the last token: the heads and
MLPs that wrote it, what each head moved (its OV edges: which term at which source position), why it
attended there (its QK edges: query-side x key-side term pairs of the pre-softmax score) and what
drove each neuron. Every expanded node's inputs, with their explicit ``rest``, sum to its value; the
root's value is checked against the model's own logit. Writes graph.html (open it in a browser: click a
node to see its exact inputs) and graph.json (the Neuronpedia / circuit-tracer graph format) in DIR.
"""

import argparse
import os

import numpy as np
import torch

import streamtap as st
from streamtap.models import load_model
from streamtap.report.graph_page import write_graph

PROMPT = "The capital of France is"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join("out", "examples"))
    ap.add_argument("--depth", type=int, default=3, help="edges from the logit that are still expanded")
    ap.add_argument("--max-inputs", type=int, default=6, help="inputs kept per node (the others go to 'rest')")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.out, "paris_graph.zarr")

    model, tok = load_model()
    enc = tok(PROMPT, return_tensors="pt")
    with st.tap(model, store, tokenizer=tok, patterns=True, neurons=True, overwrite=True), torch.no_grad():
        logits = model(**enc).logits[0, -1]
    paris = tok(" Paris", add_special_tokens=False)["input_ids"][0]

    ds = st.open(store)                                   # from here on, the store alone
    g = st.analysis.attribution_graph(ds, 0, " Paris", position=-1, depth=args.depth, max_inputs=args.max_inputs,
                                      tokenizer=tok)
    root = g.nodes.iloc[0]
    model_logit = float(logits[paris])
    print(f'graph of the " Paris" logit at "{PROMPT}": {len(g.nodes)} nodes, {len(g.edges)} edges, depth '
          f"{args.depth}; root {root.value:.4f}, model {model_logit:.4f} (diff {abs(root.value - model_logit):.1e})")
    assert abs(root.value - model_logit) <= 1e-4 * abs(model_logit) + 1e-4

    # every expanded node's inputs sum to its value: the graph is exact, pruning goes to 'rest'
    sums = g.edges.groupby("target").weight.sum()
    expanded = g.nodes[g.nodes.expanded].set_index("node_id")
    worst = float(np.max(np.abs(sums.reindex(expanded.index).values - expanded.value.values)
                         / (np.abs(expanded.value.values) + 1e-6)))
    print(f"{len(expanded)} expanded nodes; largest |sum of inputs - value| / |value|: {worst:.1e}")

    nodes = g.nodes.set_index("node_id")
    name = lambda node: f"{nodes.label[node]} @ {nodes.token[node]!r}"  # noqa: E731
    print("\nthe logit's strongest inputs:")
    for _, e in g.inputs(root.node_id).head(args.max_inputs + 1).iterrows():
        print(f"  {name(e.source):<36} {e.weight:+8.3f}")

    heads = g.nodes[(g.nodes.kind == "head") & g.nodes.expanded]
    top = heads.loc[heads.value.abs().idxmax()]
    print(f"\nwhat {top.label} moved (OV edges, value {top.value:+.3f}):")
    for _, e in g.inputs(top.node_id).head(5).iterrows():
        print(f"  {name(e.source):<36} {e.weight:+8.3f}")
    qk = g.qk[(g.qk.head_node == top.node_id) & (g.qk.part == "pair")]
    if len(qk):
        key = int(qk.key_pos.iloc[0])
        print(f"why it attended to {str(g.prompt_tokens[key])!r} at {key} (QK edges: pre-softmax score {qk.score.iloc[0]:+.3f}):")
        for _, r in qk.reindex(qk.value.abs().sort_values(ascending=False).index).head(5).iterrows():
            print(f"  query {r.query_term:<20} x key {r.key_term:<20} {r.value:+8.3f}")

    neurons = g.nodes[(g.nodes.kind == "neuron") & g.nodes.expanded]
    if len(neurons):
        n = neurons.loc[neurons.value.abs().idxmax()]
        print(f"\nstrongest expanded neuron {n.label} ({n.value:+.3f}, its frozen gain times its exact inputs):")
        for _, e in g.inputs(n.node_id).head(4).iterrows():
            print(f"  {name(e.source):<36} {e.weight:+8.3f}")

    page = write_graph(g, args.out)
    print(f"\npage: {page}; graph json: {os.path.join(args.out, 'graph.json')}")


if __name__ == "__main__":
    main()
