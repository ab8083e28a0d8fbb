"""Effective ranks of SmolLM2's fused attention matrices (W_QK, W_OV) against their factors, layer by layer.

    python examples/effective_ranks.py [--out DIR]

Every head's W_Q, W_K, W_V (576 x 64) and W_O (64 x 576) have rank at most 64; so do the fused
576 x 576 matrices W_QK = W_Q W_K^T and W_OV = W_V W_O. How many of those 64 dimensions a head really
uses shows in the effective rank (exp of the entropy of the normalised singular values) and in the
rank that keeps 99% of the energy. Prints per-layer means and the heads that need the fewest
dimensions, and saves effective_rank.png in DIR.
"""

import argparse
import os

import numpy as np

import streamtap as st
from streamtap.report import figures
from streamtap.models import load_model


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join("out", "examples"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.out, "ranks.zarr")
    model, tok = load_model()
    st.capture(model, ["Effective rank of attention heads."], store, tokenizer=tok, overwrite=True)
    ds = st.open(store)     # the store carries W_Q, W_K, W_V and W_O
    er = st.analysis.effective_rank(ds)
    ent = er.erank_entropy.mean("head")
    print(f"effective rank (entropy), mean over {er.sizes['head']} heads; d_head = {er.sizes['index']}")
    print("layer   W_Q   W_K  W_QK |   W_V   W_O  W_OV")
    for l in er.layer.values:
        e = ent.sel(layer=l)
        print(f"{int(l):5d} " + " ".join(f"{float(e.sel(matrix=m)):5.1f}" for m in ("W_Q", "W_K", "W_QK"))
              + " | " + " ".join(f"{float(e.sel(matrix=m)):5.1f}" for m in ("W_V", "W_O", "W_OV")))
    for fused, factors in (("W_QK", ("W_Q", "W_K")), ("W_OV", ("W_V", "W_O"))):
        f = er.erank_entropy.sel(matrix=fused)
        lower = float((f < er.erank_entropy.sel(matrix=list(factors)).min("matrix")).mean())
        e99 = er.erank_energy.sel(matrix=fused)
        print(f"{fused}: below both factors' effective rank in {lower:.0%} of heads; 99% of the energy in "
              f"{float(e99.mean()):.1f} of {er.sizes['index']} dimensions on average (min {int(e99.min())}, "
              f"max {int(e99.max())}); rank-8 truncation leaves "
              f"{float(er.truncation_error.sel(matrix=fused, rank=8).mean()):.1%} relative error on average")
        flat = f.stack(h=("layer", "head"))
        order = np.argsort(flat.values)[:3]
        print(f"  lowest {fused} effective rank: " + ", ".join(
            f"L{int(flat.layer.values[i])}H{int(flat['head'].values[i])} {flat.values[i]:.1f}" for i in order))
    path = os.path.join(args.out, "effective_rank.png")
    figures.save(figures.effective_rank_bars(er), path)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
