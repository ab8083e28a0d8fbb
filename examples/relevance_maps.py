"""Relevance and promotion maps of SmolLM2's heads for France, Paris, king, queen, London, England.

    python examples/relevance_maps.py [--out DIR] [--layers 0-29]

Relevance E W_QK E^T: how much a query token attends to a key token through one head, position
aside (SmolLM2 is rotary, so this is the offset-0 score). Promotion E W_OV W_U^T: which target
tokens a source token's message raises when the head attends to it. Prints the heads that tie
the pairs together and saves relevance.png and promotion.png in DIR.
"""

import argparse
import os

import numpy as np

import streamtap as st
from streamtap.report import figures
from streamtap.models import load_model

WORDS = [" France", " Paris", " king", " queen", " London", " England"]


def parse_layers(text, n):
    if not text:
        return None
    a, _, b = text.partition("-")
    return list(range(int(a), int(b or a) + 1))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join("out", "examples"))
    ap.add_argument("--layers", default=None, help="a layer range such as 20-29 (default: all)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.out, "maps.zarr")
    model, tok = load_model()
    st.capture(model, ["Paris is the capital of France; London is the capital of England."], store,
               tokenizer=tok, overwrite=True)
    ds = st.open(store)     # the store carries W_Q, W_K, W_V, the input norms and W_E (here W_U: tied)
    layers = parse_layers(args.layers, ds.sizes["layer"])
    rel = st.analysis.relevance(ds, WORDS, tokenizer=tok, layers=layers)
    pro = st.analysis.promotion(ds, WORDS, tokenizer=tok, layers=layers)
    print(f"{rel.sizes['layer']} layers x {rel.sizes['head']} heads, tokens {[str(t) for t in rel.query_text.values]}")
    if "rotary_note" in rel.attrs:
        print("note:", rel.attrs["rotary_note"])

    def best(maps, a, b, dims, which):
        m = maps[which].isel({dims[0]: WORDS.index(a), dims[1]: WORDS.index(b)})
        flat = m.stack(h=("layer", "head"))
        i = int(np.argmax(flat.values))
        return f"L{int(flat.layer.values[i])}H{int(flat['head'].values[i])}", float(flat.values[i])

    for a, b in ((" Paris", " France"), (" London", " England"), (" queen", " king"), (" France", " Paris")):
        h, v = best(rel, a, b, ("query", "key"), "normalized")
        print(f"relevance  query {a!r:10} -> key {b!r:10}: strongest in {h} (softmax over the six keys {v:.2f})")
    for a, b in ((" France", " Paris"), (" England", " London"), (" Paris", " France"), (" king", " queen")):
        h, v = best(pro, a, b, ("source", "target"), "normalized")
        print(f"promotion  source {a!r:10} -> target {b!r:10}: strongest in {h} ({v:+.1f} sd over the vocabulary)")
    # how often each head's promotion map is largest on its diagonal (the token promotes itself: copying)
    diag = np.einsum("lhss->lhs", pro["normalized"].values).mean(-1)
    l, h = np.unravel_index(np.argmax(diag), diag.shape)
    print(f"most copying head (mean self-promotion): L{int(pro.layer.values[l])}H{h} ({diag[l, h]:+.1f} sd)")

    heads = figures.pick_heads(rel, 6)
    figures.save(figures.token_maps(rel, heads, which="normalized", title="relevance (softmax over these keys)"),
                 os.path.join(args.out, "relevance.png"))
    heads = figures.pick_heads(pro, 6, which="normalized")
    figures.save(figures.token_maps(pro, heads, which="normalized", title="promotion (z-score over the vocabulary)"),
                 os.path.join(args.out, "promotion.png"))
    print(f"figures: {os.path.join(args.out, 'relevance.png')}, {os.path.join(args.out, 'promotion.png')}")


if __name__ == "__main__":
    main()
