"""Where the second invariant's error comes from in half precision, and what it is relative to.

    python benchmarks/output_tolerance.py [--archs llama,gemma] [--seeds 5] [--lengths 64,11,3] [--out FILE]

For every tiny architecture with patterns, float16 and bfloat16, seeds 0..N-1, right padding (and left
for decoders), a padded batch: each head's stored output z_i against sum_j A_ij v_j recomputed in float64
from the store, and the same sum with q, k and v rounded to the model's dtype first (the model rounds its
projections), per (token, layer, head). Prints, per arch and dtype, the largest error

- ``zmax``:   relative to the token's largest |z| over heads (the rule before issue 21's fix);
- ``vmax``:   relative to the largest |v_j| over the keys the query sees (the summands' scale);
- ``round``:  the q/k/v-rounded recomputation, relative to the summands' scale;
- ``rule``:   ``streamtap.attention.output_errors`` (the rule verify applies), over st.tolerance;

and the same rule on wrong stores (W_V x 1.5; each head's pattern taken from the next head), on seed 0
with right padding: the smallest over sequences of its largest error over the tolerance (above 1: every
sequence is caught) and the share of (token, layer, head) outputs caught. Numbers: docs/design.md, "The second invariant's tolerance".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import zarr

import streamtap as st
import streamtap.attention as attention
from streamtap.models import TINY_ARCHS, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _util import padded_batch  # noqa: E402

ENCODERS = {"bert", "roberta"}
REFUSED = {"deepseek_v2", "deepseek_v3"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def rounded(x: np.ndarray, dtype) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype).double().numpy()


def measure(ds, dtype) -> dict:
    """Largest errors of one store, by normalisation (see the module's docstring)."""
    att = attention.Attention(ds)
    H = att.n_heads
    worst = dict(zmax=0.0, vmax=0.0, round=0.0)
    for seq in np.unique(ds.seq.values):
        sub = ds.isel(token=attention.sequence_tokens(ds, int(seq)))
        L = ds.sizes["layer"]
        resid = attention.sequence_residuals(sub, np.arange(L))
        pos = np.asarray(sub.pos.values)
        alibi = np.asarray(sub["alibi"].values, np.float64) if "alibi" in sub else None
        z = np.asarray(sub.z.values, np.float64)
        for layer in range(L):
            cos, sin = attention.rotary_tables(sub, att.groups[layer])
            q, k, v = att.qkv(layer, resid[:, layer], cos, sin)
            heads = np.arange(H)
            A = att.pattern(layer, heads, q, k, pos, pos, alibi)
            vq = v[:, att.kv]                                                   # (key, head, e)
            out = np.einsum("hqk,khe->qhe", A, vq)
            d = np.abs(out - z[:, layer]).max(-1)                               # (query, head)
            zs = np.maximum(np.abs(z[:, layer]).max(axis=(1, 2)), 1e-30)[:, None]
            seen = att.visible(layer, pos, pos)
            vabs = np.abs(vq).max(-1)                                            # (key, head)
            vs = np.maximum(np.where(seen[:, :, None], vabs[None], 0).max(1), 1e-30)
            qr, kr, vr = (rounded(t, dtype) for t in (q, k, v))
            Ar = att.pattern(layer, heads, qr, kr, pos, pos, alibi)
            outr = np.einsum("hqk,khe->qhe", Ar, vr[:, att.kv])
            dr = np.abs(outr - z[:, layer]).max(-1)
            worst["zmax"] = max(worst["zmax"], float((d / zs).max()))
            worst["vmax"] = max(worst["vmax"], float((d / vs).max()))
            worst["round"] = max(worst["round"], float((dr / vs).max()))
    return worst


def rule(ds) -> float:
    return max(float(attention.output_errors(ds, int(s)).max()) for s in np.unique(ds.seq.values))


def wrong_stores(ds):
    """(W_V x 1.5, each head's pattern from the next head: its W_Q and W_K rolled by one head)."""
    scaled = ds.assign(W_V=ds.W_V * 1.5)
    rolled = ds.assign(W_Q=ds.W_Q.roll(head=1, roll_coords=False))
    kv = "kv_head" if "kv_head" in ds.W_K.dims else "head"
    rolled = rolled.assign(W_K=ds.W_K.roll({kv: 1}, roll_coords=False))
    return scaled, rolled


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", default=",".join(a for a in TINY_ARCHS if a not in REFUSED))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lengths", default="64,11,3")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    rows = []
    for arch in args.archs.split(","):
        for name, dtype in DTYPES.items():
            agg = dict(zmax=0.0, vmax=0.0, round=0.0, rule=0.0, scaled=np.inf, rolled=np.inf)
            for seed in range(args.seeds):
                for side in ("right",) if arch in ENCODERS else ("right", "left"):
                    model = tiny_model(arch, dtype=dtype, seed=seed)
                    ids, mask = padded_batch(model.config.vocab_size, lengths, seed=seed + 1, side=side)
                    store = zarr.storage.MemoryStore()
                    with st.tap(model, store, patterns=True), torch.no_grad():
                        model(input_ids=ids, attention_mask=mask)
                    ds = st.open(store).load()
                    tol = st.tolerance(ds)
                    got = measure(ds, dtype)
                    for key, value in got.items():
                        agg[key] = max(agg[key], value / tol)
                    agg["rule"] = max(agg["rule"], rule(ds) / tol)
                    if seed or side == "left":   # the wrong stores: on seed 0, right padding (time)
                        continue
                    for key, wrong in zip(("scaled", "rolled"), wrong_stores(ds)):
                        errs = [attention.output_errors(wrong, int(s)) for s in np.unique(ds.seq.values)]
                        agg[key] = min(float(e.max()) for e in errs) / tol   # every sequence caught, by this
                        agg[key + "_caught"] = float(np.mean(np.concatenate([(e > tol).values.ravel() for e in errs])))
            row = dict(arch=arch, dtype=name, tol=tol, **agg)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
