"""Direct and total effects on SmolLM2: head ablations, dropped empty messages, rank-reduced heads.

    python examples/effects.py [--out DIR] [--texts N] [--layers 0,8,16,18,23,29] [--threshold 0.3] [--ranks 48,32,16]

Captures the first N documents of the bundled sample, then measures on the live model (``st.effects``,
nnsight traces, the model unmodified) what each intervention costs in next-token loss and KL, next to
the direct effect the store predicts (patterns and final-norm scale frozen):

1. zero- and mean-ablating every head of the chosen layers;
2. the KV-cache question: dropping every near-empty source message (relative norm under THRESHOLD,
   ``st.analysis.empty_messages``, first tokens kept) from every head, renormalised (a cache without
   them) and not, against a control that drops as many randomly chosen messages per head;
3. fuse and rank-reduce: every head's W_OV (or W_QK) replaced by its truncation at its own 99%-energy
   effective rank (``st.analysis.effective_rank``), and at fixed ranks (``--ranks``, default 48, 32 and 16).

Saves total_vs_direct.png in DIR.
"""

import argparse
import os
from importlib import resources

import numpy as np

import streamtap as st
from streamtap import Ablate, DropSources, RankReduce
from streamtap.models import load_model
from streamtap.report import figures


def table(r, rows=None):
    rows = list(r.intervention.values) if rows is None else rows
    direct = "direct_delta_loss" in r
    print(f"  {'intervention':34}{'Δloss':>10}{'KL':>10}" + (f"{'direct Δloss':>14}{'direct KL':>11}" if direct else ""))
    for name in rows:
        x = r.sel(intervention=name)
        line = f"  {name:34}{float(x.delta_loss):+10.4f}{float(x.kl):10.4f}"
        if direct:
            line += f"{float(x.direct_delta_loss):+14.4f}{float(x.direct_kl):11.4f}"
        print(line)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="effects_out")
    p.add_argument("--texts", type=int, default=8)
    p.add_argument("--layers", default="0,8,16,18,23,29")
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--ranks", default="48,32,16", help="fixed ranks every head is truncated to, besides its own")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    sample = (resources.files("streamtap") / "data" / "sample.txt").read_text(encoding="utf-8")
    texts = [t for t in sample.splitlines() if t.strip()][:args.texts]
    model, tok = load_model(attn_implementation="eager")
    store = os.path.join(args.out, "effects.zarr")
    st.capture(model, texts, store, tokenizer=tok, overwrite=True)
    ds = st.open(store)
    ids = [tok(t)["input_ids"] for t in texts]
    n_layers, n_heads = ds.sizes["layer"], ds.sizes["head"]
    layers = [int(x) for x in args.layers.split(",")]

    # 1. heads
    heads = {}
    for layer in layers:
        for head in range(n_heads):
            heads[f"L{layer}H{head} zero"] = Ablate(layer, head)
            heads[f"L{layer}H{head} mean"] = Ablate(layer, head, "mean")
    r = st.effects(model, ids, heads, store=ds, batch_size=8)
    print(f"{len(texts)} texts, {r.attrs['n_tokens']} tokens; clean loss {r.attrs['loss_clean']:.4f} nats/token")
    order = np.argsort(-r["delta_loss"].values)
    print(f"1. head ablations, layers {layers} ({len(heads)} interventions), largest total Δloss:")
    table(r, list(r.intervention.values[order[:8]]))
    for how in ("zero", "mean"):
        sel = r.where(r.kind == how, drop=True)
        c = np.corrcoef(sel.delta_loss.values, sel.direct_delta_loss.values)[0, 1]
        print(f"  {how}-ablation: corr(total, direct Δloss) = {c:.3f}; mean total {float(sel.delta_loss.mean()):+.4f}, "
              f"mean direct {float(sel.direct_delta_loss.mean()):+.4f}; "
              f"share of heads with total > 2 x direct: {float((sel.delta_loss > 2 * sel.direct_delta_loss.clip(min=0)).mean()):.2f}")
    figures.save(figures.total_vs_direct(r), os.path.join(args.out, "total_vs_direct.png"))

    # 2. empty messages
    em = st.analysis.empty_messages(ds).compute()
    near = (em["relative_norm"] < args.threshold) & ~em["first"]
    seqs = np.asarray(ds["seq"].values)
    rng = np.random.default_rng(0)
    candidates = ~np.asarray(em["first"].values)
    drop, renorm, control = [], [], []
    n_near = int(near.sum())
    for layer in range(n_layers):
        for head in range(n_heads):
            mask = np.asarray(near.isel(layer=layer, head=head).values)
            if not mask.any():
                continue
            per_text = [mask[seqs == s] for s in np.unique(seqs)]
            drop.append(DropSources(layer, head, per_text))
            renorm.append(DropSources(layer, head, per_text, True))
            random = np.zeros_like(mask)
            random[rng.choice(np.flatnonzero(candidates), int(mask.sum()), replace=False)] = True
            control.append(DropSources(layer, head, [random[seqs == s] for s in np.unique(seqs)], True))
    r2 = st.effects(model, ids, {"drop near-empty": drop, "drop near-empty, renormalised": renorm,
                                 "drop as many random, renormalised": control}, batch_size=8)
    print(f"2. near-empty source messages (relative norm < {args.threshold}, first tokens kept): {n_near} of "
          f"{int(candidates.sum()) * n_layers * n_heads} ({100 * n_near / (candidates.sum() * n_layers * n_heads):.2f}%), "
          f"in {len(drop)} heads")
    table(r2)

    # 3. rank reduction
    er = st.analysis.effective_rank(ds)
    groups = {}
    for m in ("OV", "QK"):
        e_rank = er["erank_energy"].sel(matrix=f"W_{m}").values
        groups[f"all heads {m} at 99%-energy rank"] = [RankReduce(l, h, int(e_rank[l, h]), m)
                                                     for l in range(n_layers) for h in range(n_heads)]
        for rank in (int(x) for x in args.ranks.split(",")):
            groups[f"all heads {m} rank {rank}"] = [RankReduce(l, h, rank, m) for l in range(n_layers) for h in range(n_heads)]
    r3 = st.effects(model, ids, groups, store=ds, batch_size=8)
    print("3. fused matrices truncated in every head (direct effect of a W_QK change is 0: it acts through the pattern)")
    for m in ("OV", "QK"):
        e = er["erank_energy"].sel(matrix=f"W_{m}")
        kept = float(e.mean())
        print(f"  W_{m}: 99%-energy effective rank mean {kept:.1f} of {ds.sizes['d_head']} (min {int(e.min())}); "
              f"parameters kept {kept / ds.sizes['d_head']:.0%}")
    table(r3)


if __name__ == "__main__":
    main()
