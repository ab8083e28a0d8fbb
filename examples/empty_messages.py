"""Look for SmolLM2's empty source messages: tokens that send (almost) nothing through a head.

    python examples/empty_messages.py [--out DIR] [--texts N] [--threshold 0.3]

Captures the first N documents of the bundled sample (default all 40); then, from the store alone,
``st.analysis.empty_messages`` gives every source message m[j] = (attn_norm(x_j) W_V + b_V) W_O (what
token j sends through a head to any query that reads it): its norm relative to the head's typical
message (the geometric mean over the tokens that are not first in their sequence), and its cosine
with the mean embedding of the most frequent and of the rarest tokens, against two controls (the same
number of random vocabulary tokens, and a random direction of model space). The first token of each
sequence, whose residual is huge, is reported apart.

Printed: the distribution of relative norms (first tokens apart), which source tokens and which heads
send the near-empty messages (relative norm under THRESHOLD), and whether those messages resemble
frequent or rare tokens more than the controls, with token frequency counted in the stored corpus and
taken from the tokenizer's BPE merge ranks. Last, the seed's own test: which vocabulary token is
nearest each message, and is it a frequent or a rare one more often than for random directions.
Saves message_norms.png in DIR.
"""

import argparse
import os
from collections import Counter
from importlib import resources

import numpy as np

import streamtap as st
from streamtap.models import load_model
from streamtap.report import figures

DIRECTIONS = ("frequent", "rare", "random", "isotropic")


def words(ds, ids, tok):
    return ", ".join(repr(str(w)) for w in st.analysis.vocab_text(ds, list(ids), tok))


def resemblance(em, near, tok, ds):
    """Mean cosine and mean |cosine| of near-empty, other and first-token messages with each direction."""
    first = em["first"]
    groups = {"near-empty": near, "others": ~near & ~first, "first tokens": first}
    print(f"  frequent: {words(ds, em.attrs['frequent_ids'], tok)}")
    print(f"  rare:     {words(ds, em.attrs['rare_ids'], tok)}")
    print(f"  {'mean cos (mean |cos|)':24}" + "".join(f"{d:>18}" for d in DIRECTIONS))
    table = {}
    for group, mask in groups.items():
        row = {d: (float(em[f"cos_{d}"].where(mask).mean()), float(abs(em[f"cos_{d}"]).where(mask).mean()))
               for d in DIRECTIONS}
        table[group] = row
        print(f"  {group:24}" + "".join(f"{c:+9.4f} ({a:.4f})" for c, a in row.values()))
    control = max(table["near-empty"]["random"][1], table["near-empty"]["isotropic"][1])
    for d in ("frequent", "rare"):
        a = table["near-empty"][d][1]
        verdict = "yes" if a > control else "no"
        print(f"  near-empty messages closer to the {d}-token direction than to the controls: {verdict} "
              f"(mean |cos| {a:.4f} vs {control:.4f})")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join("out", "examples"))
    ap.add_argument("--texts", type=int, default=40)
    ap.add_argument("--threshold", type=float, default=0.3, help="near-empty: relative norm below this")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.out, "empty.zarr")
    sample = (resources.files("streamtap") / "data" / "sample.txt").read_text(encoding="utf-8")
    texts = [t for t in sample.splitlines() if t.strip()][:args.texts]
    model, tok = load_model()
    st.capture(model, texts, store, tokenizer=tok, overwrite=True)      # patterns are not needed here

    ds = st.open(store)                                   # from here on, the store alone
    em = st.analysis.empty_messages(ds, seed=args.seed).compute()
    rel, first = em.relative_norm, em["first"]
    n_first = int(first.sum())
    n_heads = em.sizes["layer"] * em.sizes["head"]
    print(f"{em.sizes['token']:,} tokens ({n_first} first in their sequence) x {n_heads} heads = "
          f"{em.sizes['token'] * n_heads:,} source messages")
    print(f"relative norm |m| / head's typical |m|: median {float(rel.where(~first).median()):.2f} for the "
          f"others, {float(rel.where(first).median()):.2f} for first tokens")
    print("share of messages under a relative norm of:")
    for t in (0.1, 0.2, 0.3, 0.5):
        print(f"  {t:<4g}  others {float((rel < t).where(~first).mean()):7.2%}   "
              f"first tokens {float((rel < t).where(first).mean()):7.2%}")

    near = (rel < args.threshold) & ~first
    n_near = int(near.sum())
    print(f"near-empty (relative norm < {args.threshold:g}, first tokens apart): {n_near:,} messages")
    t_idx, l_idx, h_idx = np.nonzero(near.values)
    if n_near:
        counts = Counter(str(x) for x in em.text.values[t_idx]) if "text" in em.coords else Counter()
        occurs = Counter(str(x) for x in em.text.values[~first.values]) if "text" in em.coords else Counter()
        rank = {w: i + 1 for i, (w, _) in enumerate(occurs.most_common())}
        print("  sent by: " + ", ".join(f"{w!r} {c:,} ({c / n_near:.0%}; corpus rank {rank[w]})"
                                        for w, c in counts.most_common(4)))
        print(f"  in layers {l_idx.min()}-{l_idx.max()}; heads with most: " + ", ".join(
            f"L{a}H{b} {c / (~first).sum().item():.1%} of tokens"
            for (a, b), c in Counter(zip(l_idx.tolist(), h_idx.tolist())).most_common(5)))

    print("resemblance, frequency counted in the stored corpus (ties: smaller id first):")
    resemblance(em, near, tok, ds)
    ranks = st.analysis.merge_ranks(tok, ds.sizes.get("vocab"))
    em_ranks = st.analysis.empty_messages(ds, frequency=ranks, seed=args.seed).compute()
    print("resemblance, frequency from the tokenizer's BPE merge ranks (low rank = frequent):")
    resemblance(em_ranks, near, tok, ds)

    # the seed's own test: is the vocabulary token nearest each message a frequent or a rare one?
    rng = np.random.default_rng(args.seed)
    rest = np.argwhere((~near & ~first).values)
    others = rest[rng.choice(len(rest), size=min(len(rest), max(n_near, 500)), replace=False)]
    picked = {"near-empty": np.stack([t_idx, l_idx, h_idx], 1), "others": others}
    rows = np.unique(np.concatenate([p[:, 0] for p in picked.values()]))
    msgs = st.analysis.source_messages(ds.isel(token=rows)).values          # (rows, layer, head, d_model)
    E = np.asarray(ds["W_U"].values if "W_U" in ds else ds["W_E"].values, np.float64)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    r = ranks.values
    ranked = np.isfinite(r)
    pct = np.full(r.size, np.nan)
    pct[np.argsort(np.where(ranked, r, np.inf))[:ranked.sum()]] = np.arange(ranked.sum()) / ranked.sum()
    picked = {k: msgs[np.searchsorted(rows, p[:, 0]), p[:, 1], p[:, 2]] for k, p in picked.items()}
    picked["isotropic control"] = rng.standard_normal((max(n_near, 500), E.shape[1]))
    print("nearest vocabulary token (cosine with the tied embeddings), by merge rank:")
    for k, m in picked.items():
        if not len(m):
            continue
        p = pct[np.argmax(m @ E.T, axis=1)]
        print(f"  {k:18} n={len(m):5,}: among the 10% most frequent {np.nanmean(p < 0.1):.0%}, "
              f"the 10% rarest {np.nanmean(p >= 0.9):.0%}")

    path = os.path.join(args.out, "message_norms.png")
    figures.save(figures.message_norm_distribution(em, threshold=args.threshold), path)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
