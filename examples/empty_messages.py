"""Find SmolLM2's near-empty messages: heads that, token after token, write almost nothing.

    python examples/empty_messages.py [--out DIR] [--texts N]

Captures the first N documents of the bundled sample (default all 40), then, from the store alone:
per head and token the message norm relative to the residual entering the layer, and its cosine
with the mean embedding of the corpus's most and least frequent tokens. Prints the heads that are
near-empty on most tokens and saves message_norms.png in DIR.
"""

import argparse
import os
from importlib import resources

import numpy as np

import streamtap as st
from streamtap.report import figures
from streamtap.models import load_model

THRESHOLD = 0.02


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join("out", "examples"))
    ap.add_argument("--texts", type=int, default=40)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.out, "empty.zarr")
    sample = (resources.files("streamtap") / "data" / "sample.txt").read_text(encoding="utf-8")
    texts = [t for t in sample.splitlines() if t.strip()][:args.texts]
    model, tok = load_model()
    st.capture(model, texts, store, tokenizer=tok, overwrite=True)

    ds = st.open(store)                                   # from here on, the store alone
    em = st.analysis.empty_messages(ds).compute()
    summary = st.analysis.empty_message_summary(em, threshold=THRESHOLD)
    words = st.analysis.vocab_text(ds, em.attrs["frequent_ids"][:6])
    print(f"{em.sizes['token']:,} tokens x {summary.layer.size} layers x {summary.sizes['head']} heads; "
          f"near-empty: |message| < {THRESHOLD:g} x |residual entering the layer|; "
          f"most frequent tokens: {', '.join(repr(str(w)) for w in words)}")
    print(f"near-empty messages overall: {float((em.relative_norm < THRESHOLD).mean()):.1%}")
    flat = summary.stack(h=("layer", "head"))
    order = np.argsort(-flat.fraction_empty.values, kind="stable")[:8]
    print(f"heads near-empty on at least half the tokens: {int(summary.mostly_empty.sum())}")
    for i in order:
        print(f"  L{int(flat.layer.values[i])}H{int(flat['head'].values[i])}: near-empty on "
              f"{flat.fraction_empty.values[i]:.0%} of tokens, mean relative norm "
              f"{flat.mean_relative_norm.values[i]:.3f}, cos with frequent-token direction when empty "
              f"{flat.cos_frequent_empty.values[i]:+.2f} (rare {flat.cos_rare_empty.values[i]:+.2f})")
    empty = em.relative_norm < THRESHOLD
    cf = em.cos_frequent.where(empty)
    cf_full = em.cos_frequent.where(~empty)
    print(f"mean cosine with the frequent-token direction: near-empty messages {float(cf.mean()):+.3f}, "
          f"the others {float(cf_full.mean()):+.3f}; with the rare-token direction: "
          f"{float(em.cos_rare.where(empty).mean()):+.3f} and {float(em.cos_rare.where(~empty).mean()):+.3f}")
    path = os.path.join(args.out, "message_norms.png")
    figures.save(figures.message_norm_distribution(em, threshold=THRESHOLD), path)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
