"""SmolLM2's induction circuit, edge by edge, from a store: K-composition on the key side, the copied token on OV.

    python examples/induction_circuit.py [--out DIR] [--length 30] [--queries 8] [--seed 0]

An induction head at query p in the second copy of a repeated random sequence attends to key
j = p - LENGTH + 1, the token after the earlier copy of p's token. The textbook circuit: a
previous-token head writes, at j, what the token before j was; the induction head's key reads it
(K-composition), so query and key match; what it moves from j (OV) is j's own token, which the model
then predicts. From the store alone, with patterns and norms frozen:

- ``st.analysis.qk_edges`` splits the induction head's pre-softmax score at (p, j) into query-side x
  key-side term pairs; its key-side marginal shows which upstream terms at j made the key match. The
  example prints the strongest ones and checks that the top previous-token head (by
  ``head_scores``) is the strongest key-side term;
- ``st.analysis.ov_edges`` splits the head's output at p into (term, source position) shares: what it
  moved from j, and which of j's terms carried it (the token's embedding, or the first MLP's output, the
  "extended embedding" through which small models read a token's identity).

The scores are sums of exact edges: the QK matrix adds up to the model's pre-softmax score.
"""

import argparse
import os

import numpy as np

import streamtap as st
from streamtap.models import load_model


def strongest(scores, n=1):
    """The n highest (layer, head, value) of a (layer, head) DataArray."""
    flat = scores.stack(h=("layer", "head"))
    order = np.argsort(-flat.values, kind="stable")[:n]
    return [(int(flat.layer.values[i]), int(flat["head"].values[i]), float(flat.values[i])) for i in order]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join("out", "examples"))
    ap.add_argument("--length", type=int, default=30, help="random tokens per copy")
    ap.add_argument("--queries", type=int, default=8, help="queries of the second copy to explain")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.out, "induction_circuit.zarr")

    model, tok = load_model()
    probe = st.induction_probe(model, store, length=args.length, repeats=2, batch=1, seed=args.seed, tokenizer=tok,
                               overwrite=True)
    L, prefix = probe.length, probe.prefix
    print(f"probe: {L} random tokens repeated once; loss {probe.loss_first:.2f} -> {probe.loss_second:.2f} nats/token")

    ds = st.open(store)                                   # from here on, the store alone
    scores = st.analysis.head_scores(ds)
    (li, hi, s_ind), = strongest(scores.induction)
    prev = [(a, b, v) for a, b, v in strongest(scores.previous_token, 20) if a < li]
    (lp, hp, s_prev) = prev[0]
    ind_name, prev_name = f"L{li}H{hi}", f"L{lp}H{hp}"
    print(f"induction head {ind_name} (score {s_ind:.3f}); strongest earlier previous-token head {prev_name} "
          f"(score {s_prev:.3f})")

    queries = np.linspace(prefix + L + 1, prefix + 2 * L - 1, args.queries).round().astype(int)
    print(f"\nQK edges of {ind_name}: query p (second copy) -> key j = p - {L - 1} (after the first copy's token)")
    print(f"{'p':>4} {'j':>4}  {'key token':<14} {'score':>7} {'A[p,j]':>7}  {'strongest key-side term':<24}"
          f" {prev_name + ' at j':>10}")
    top_is_prev, prev_share = 0, []
    for p in queries:
        j = int(p - L + 1)
        q = st.analysis.qk_edges(ds, 0, li, hi, int(p), j)
        assert abs(float(q.matrix.sum() + q.alibi) - float(q.score)) <= 1e-5 * abs(float(q.score)) + 1e-6
        by_key = q.by_key_term
        k = int(np.argmax(np.abs(by_key.values)))
        top, from_prev = str(by_key.key_term.values[k]), float(by_key.sel(key_term=prev_name))
        top_is_prev += top == prev_name
        prev_share.append(from_prev / float(q.score))
        text = repr(str(st.analysis.vocab_text(ds, [int(ds.token_id.isel(token=j))], tok)[0]))
        print(f"{p:>4} {j:>4}  {text:<14} {float(q.score):>+7.2f} {float(q.pattern):>7.3f}  "
              f"{top + f' {float(by_key.values[k]):+.2f}':<24} {from_prev:>+10.2f}")
    print(f"K-composition: {prev_name}'s output at the key is the strongest key-side term in {top_is_prev} of "
          f"{len(queries)} queries; it gives a median {np.median(prev_share):.0%} of the score")

    print(f"\nOV edges of {ind_name}: each term's share of the head's output at p, measured along that output "
          "(shares sum to 1 exactly)")
    print(f"{'p':>4} {'j':>4}  {'|output|':>8} {'from j':>7} {'embed at j':>10} {'L0_mlp at j':>11}  strongest terms at j")
    ext, leads = [], []
    for p in queries:
        j = int(p - L + 1)
        full = st.analysis.ov_edges(ds, 0, li, hi, int(p))
        out = full.sum(("component", "source")).values
        share = (full * (out / float(out @ out))).sum("d_model")   # each term's share of the output, summing to 1
        at_j = share.isel(source=j)
        order = np.argsort(-np.abs(at_j.values))[:3]
        embed, first_mlp = float(at_j.sel(component="embed")), float(at_j.sel(component="L0_mlp"))
        if float(at_j.sum()) > 0.5:                        # the head attends to j at this query
            ext.append(embed + first_mlp)
            leads.append(str(at_j.component.values[order[0]]))
        print(f"{p:>4} {j:>4}  {np.linalg.norm(out):>8.2f} {float(at_j.sum()):>7.1%} {embed:>10.1%} {first_mlp:>11.1%}  "
              + ", ".join(f"{at_j.component.values[i]} {at_j.values[i]:.1%}" for i in order))
    lead = max(set(leads), key=leads.count)
    print(f"OV: where it attends, the head moves the key's terms; the largest single one is {lead} at j in "
          f"{leads.count(lead)} of {len(leads)} queries; embedding + first MLP (the token's extended embedding) give "
          f"a median {np.median(ext):.0%} of the output")

if __name__ == "__main__":
    main()
