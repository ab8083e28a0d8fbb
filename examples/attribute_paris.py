"""Attribute " Paris" after "The capital of France is" to SmolLM2's heads and MLPs, from the store alone.

    python examples/attribute_paris.py [--out DIR]

Taps one forward of the prompt, then, offline: direct logit attribution of the " Paris" logit (and of
the " Paris" - " London" logit difference) at the last token, checked against the model's own logit;
the logit lens at that token. Saves paris_heatmap.png and paris_lens.png in DIR.
"""

import argparse
import os

import numpy as np
import torch

import streamtap as st
from streamtap.report import figures
from streamtap.models import load_model

PROMPT = "The capital of France is"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join("out", "examples"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    store = os.path.join(args.out, "paris.zarr")

    model, tok = load_model()
    enc = tok(PROMPT, return_tensors="pt")
    with st.tap(model, store, tokenizer=tok, overwrite=True), torch.no_grad():
        logits = model(**enc).logits[0, -1]

    ds = st.open(store)                                   # from here on, the store alone
    last = ds.isel(token=ds.sizes["token"] - 1)
    paris, london = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" Paris", " London"))
    contrib = st.analysis.direct_logit_attribution(last, paris).compute()
    total, model_logit = float(contrib.sum()), float(logits[paris])
    print(f'" Paris" logit at "{PROMPT}": model {model_logit:.4f}, sum of {contrib.sizes["component"]} '
          f"direct contributions {total:.4f} (diff {abs(total - model_logit):.1e})")
    assert abs(total - model_logit) <= 1e-4 * abs(model_logit) + 1e-4

    for kind, n in (("head", 8), ("mlp", 5)):
        part = contrib.where(contrib.kind == kind, drop=True)
        order = np.argsort(-part.values)[:n]
        print(f"top {n} {kind}s: " + ", ".join(f"{part.component.values[i]} {part.values[i]:+.2f}" for i in order))
    by_kind = contrib.groupby("kind").sum()
    print("totals: " + ", ".join(f"{k} {v:+.2f}" for k, v in zip(by_kind.kind.values, by_kind.values)))

    diff = st.analysis.direct_logit_attribution(last, paris, foil=london).compute()
    order = np.argsort(-diff.values)[:5]
    print(f'" Paris" - " London": {float(diff.sum()):+.3f} (model {float(logits[paris] - logits[london]):+.3f}); '
          "largest: " + ", ".join(f"{diff.component.values[i]} {diff.values[i]:+.2f}" for i in order))

    lens = st.analysis.logit_lens(last, k=5, target=paris).compute()
    first = int(np.argmax(lens.target_rank.values == 0)) if (lens.target_rank.values == 0).any() else None
    where = str(lens.depth.values[first]) if first is not None else "never"
    print(f'logit lens: " Paris" first becomes the top token at {where}; final probability '
          f"{float(lens.target_prob.values[-1]):.3f}")

    text = lambda ids: st.analysis.vocab_text(ds, ids, tok)  # noqa: E731
    figures.save(figures.contribution_heatmap(contrib, title='direct contributions to " Paris"'),
                 os.path.join(args.out, "paris_heatmap.png"))
    figures.save(figures.logit_lens_table(lens, text, k=5, title='logit lens at "... France is"'),
                 os.path.join(args.out, "paris_lens.png"))
    print(f"figures: {os.path.join(args.out, 'paris_heatmap.png')}, {os.path.join(args.out, 'paris_lens.png')}")


if __name__ == "__main__":
    main()
