"""Find SmolLM2's induction and previous-token heads with the standard probe, and check them.

    python examples/induction_heads.py [--out DIR] [--length 50] [--batch 4] [--seed 0] [--top 5]

The probe (``st.induction_probe``) feeds BATCH sequences of LENGTH distinct random tokens, each
repeated once, after the tokenizer's BOS token, through the tap with ``patterns=True``. A model that
has learnt induction (A B ... A -> B) predicts the second copy from the first, which nothing else
can do on random tokens: the loss falls between the halves. From the store alone,
``st.analysis.head_scores`` then gives every head's induction score (attention on the token after
an earlier copy of the query's token) and previous-token score (attention on the key just before
the query).

As a check independent of streamtap's pattern recomputation, the same scores are computed from the
model's own attention probabilities (eager attention, ``output_attentions=True``) on the same ids,
by position alone: in the second copy, query p's induction target is p - LENGTH + 1. Finally the
loss of the same random tokens without the BOS prefix shows how much that prefix changes.
"""

import argparse
import os

import numpy as np
import torch

import streamtap as st
from streamtap.models import load_model


def top_heads(scores, n):
    """The n highest (name, value) of a (layer, head) DataArray."""
    flat = scores.stack(h=("layer", "head"))
    order = np.argsort(-flat.values, kind="stable")[:n]
    return [(int(flat.layer.values[i]), int(flat["head"].values[i]), float(flat.values[i])) for i in order]


def halves_loss(logits, ids, prefix, length):
    """Mean next-token loss over predictions inside the first copy and of the later copies."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1).numpy()
    target = np.arange(1, ids.shape[1])
    first = (target > prefix) & (target < prefix + length)
    return float(nll[:, first].mean()), float(nll[:, target >= prefix + length].mean())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join("out", "examples"))
    ap.add_argument("--length", type=int, default=50, help="random tokens per copy")
    ap.add_argument("--batch", type=int, default=4, help="sequences")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=5, help="heads to show per score")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.out, "induction.zarr")

    # eager attention: the model's own probabilities for the cross-check (the terms are the same either way)
    model, tok = load_model(attn_implementation="eager")
    probe = st.induction_probe(model, store, length=args.length, repeats=2, batch=args.batch, seed=args.seed,
                               tokenizer=tok, overwrite=True)
    L, prefix = probe.length, probe.prefix
    print(f"probe: {args.batch} sequences of {tok.convert_ids_to_tokens(int(probe.input_ids[0, 0]))!r} + "
          f"{L} random tokens, repeated once ({probe.input_ids.shape[1]} tokens each, seed {args.seed})")
    print(f"loss: first copy {probe.loss_first:.2f} nats/token, second copy {probe.loss_second:.2f}, "
          f"drop {probe.loss_drop:.2f}")

    ds = st.open(store)                                   # from here on, the store alone
    scores = st.analysis.head_scores(ds)
    ind, prev = top_heads(scores.induction, args.top), top_heads(scores.previous_token, args.top)
    print("top induction heads:      " + ", ".join(f"L{a}H{b} {v:.3f}" for a, b, v in ind))
    print("top previous-token heads: " + ", ".join(f"L{a}H{b} {v:.3f}" for a, b, v in prev))

    # the same scores from the model's own attentions, by position alone
    ids = torch.as_tensor(probe.input_ids)
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    A = torch.stack(out.attentions, 1).double().numpy()   # (batch, layer, head, query, key)
    n = ids.shape[1]
    later = np.arange(prefix + L, n)                       # queries in the second copy
    own_induction = A[..., later, later - L + 1].mean((0, -1))
    q = np.arange(1, n)
    own_previous = A[..., q, q - 1].mean((0, -1))
    own_loss = halves_loss(out.logits, ids, prefix, L)
    print("model's own attentions (eager, output_attentions=True), same ids:")
    for name, heads, own in (("induction", ind, own_induction), ("previous-token", prev, own_previous)):
        print(f"  {name:15} " + ", ".join(f"L{a}H{b} {own[a, b]:.3f}" for a, b, _ in heads))
    diff_i = np.abs(own_induction - scores.induction.values).max()
    diff_p = np.abs(own_previous - scores.previous_token.values).max()
    print(f"  max |streamtap - own| over all {own.size} heads: induction {diff_i:.1e}, previous-token {diff_p:.1e}; "
          f"loss halves {own_loss[0]:.2f} / {own_loss[1]:.2f}")
    assert diff_i < 1e-4 and diff_p < 1e-4

    # without the BOS prefix (the plain-transformers probe the issue measured has none)
    plain = ids[:, prefix:]
    with torch.no_grad():
        logits = model(input_ids=plain).logits
    first, second = halves_loss(logits, plain, 0, L)
    print(f"same tokens without the BOS prefix: first copy {first:.2f}, second copy {second:.2f}, "
          f"drop {first - second:.2f}")


if __name__ == "__main__":
    main()
