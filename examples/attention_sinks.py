"""Find SmolLM2's attention-sink heads and which of them are switched off, from a store with patterns.

    python examples/attention_sinks.py [--out DIR] [--texts N] [--threshold 0.8] [--show 8]

Captures the first N documents of the bundled sample (default all 40) with ``patterns=True``; then,
from the store alone, ``st.analysis.head_scores`` gives each head's **sink mass** (its mean attention
on the first token of the sequence, over the queries after it) and the first token's source message
relative to the head's typical one. A head that parks its attention on a sink whose message is small
adds almost nothing at that query: it is **off** there (``off``: the share of queries where the sink
mass reaches 0.8 and the sink's message is under a tenth of the head's median message).

The count of sink heads is checked against the model's own attention probabilities (eager
attention, ``output_attentions=True``) on the same texts, and given per text too: it depends on
the text.
"""

import argparse
import os
from importlib import resources

import numpy as np
import torch

import streamtap as st
from streamtap.models import load_model


def own_sink_mass(model, tok, texts, batch=8):
    """Mean attention on the first token over the queries after it, per (layer, head), from the model's
    own eager attentions: pooled over all texts, and per text."""
    total, queries, per_text = 0.0, 0, []
    tok.padding_side = "right"                       # a real query never sees a padded key
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**enc, output_attentions=True)
        A = torch.stack(out.attentions, 1).double().numpy()      # (text, layer, head, query, key)
        for row, n in enumerate(enc["attention_mask"].sum(-1).tolist()):
            on_first = A[row, :, :, 1:n, 0]                       # queries after the first token
            total, queries = total + on_first.sum(-1), queries + n - 1
            per_text.append(on_first.mean(-1))
    return total / queries, np.stack(per_text)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join("out", "examples"))
    ap.add_argument("--texts", type=int, default=40)
    ap.add_argument("--threshold", type=float, default=0.8, help="sink mass that makes a sink head")
    ap.add_argument("--show", type=int, default=8, help="heads to list")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.out, "sinks.zarr")
    sample = (resources.files("streamtap") / "data" / "sample.txt").read_text(encoding="utf-8")
    texts = [t for t in sample.splitlines() if t.strip()][:args.texts]
    model, tok = load_model(attn_implementation="eager")
    st.capture(model, texts, store, tokenizer=tok, patterns=True, overwrite=True)

    ds = st.open(store)                                   # from here on, the store alone
    scores = st.analysis.head_scores(ds)
    n_heads = scores.sink_mass.size
    flat = scores.stack(h=("layer", "head"))
    name = [f"L{a}H{b}" for a, b in zip(flat.layer.values, flat["head"].values)]
    mass, message, off = flat.sink_mass.values, flat.sink_message.values, flat.off.values
    sinks = np.flatnonzero(mass > args.threshold)
    sinks = sinks[np.argsort(-mass[sinks], kind="stable")]
    print(f"{ds.sizes['token']:,} tokens in {len(texts)} texts (the first token is the text's own: "
          f"SmolLM2's tokenizer adds no BOS)")
    print(f"sink heads (mean attention on the first token > {args.threshold:g}): {sinks.size} of {n_heads}, "
          f"in layers {', '.join(str(int(x)) for x in np.unique(flat.layer.values[sinks]))}")
    switched = sinks[off[sinks] > 0.5]
    print(f"off on more than half their queries (first token's message < {scores.attrs['off_norm']:g} x the "
          f"head's median): {switched.size} of them")
    for i in switched[:args.show]:
        print(f"  {name[i]:6} sink mass {mass[i]:.3f}, sink message {message[i]:.3f} x typical, off on {off[i]:.0%}")
    reading = sinks[message[sinks] > 0.5]
    print(f"sink heads whose first token still sends a sizeable message (> 0.5 x typical): {reading.size}")
    for i in reading[:args.show]:
        print(f"  {name[i]:6} sink mass {mass[i]:.3f}, sink message {message[i]:.3f} x typical, off on {off[i]:.0%}")

    # the same count from the model's own attentions
    own, per_text = own_sink_mass(model, tok, texts)
    counts = (per_text > args.threshold).sum((1, 2))
    print(f"model's own attentions (eager, output_attentions=True): {int((own > args.threshold).sum())} sink heads; "
          f"max |streamtap - own| sink mass {np.abs(own - scores.sink_mass.values).max():.1e}")
    print(f"per text: {int(np.median(counts))} sink heads (median; {counts.min()} to {counts.max()})")


if __name__ == "__main__":
    main()
