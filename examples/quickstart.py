"""The README's ten lines: tap SmolLM2 around a plain forward, verify, and attribute " Paris".

    python examples/quickstart.py [STORE]        # default: ./quickstart.zarr (replaced)
"""

import sys

import torch

import streamtap as st
from streamtap.models import load_model

store = sys.argv[1] if len(sys.argv) > 1 else "quickstart.zarr"
model, tok = load_model()
batch = tok(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
with st.tap(model, store, tokenizer=tok, overwrite=True), torch.no_grad():
    model(**batch)
ds = st.open(store)
errors = st.verify(ds)
terms = st.decompose(ds)
paris = st.analysis.direct_logit_attribution(ds, tok(" Paris", add_special_tokens=False)["input_ids"][0])
last = paris.isel(token=4)  # "The capital of France is" is the first row's five tokens
print(f"{ds.sizes['token']} tokens, {terms.sizes['component']} components, max error {errors.attrs['max_rel_error']:.1e}")
print("top direct contributors to ' Paris':", ", ".join(last.sortby(last).component.values[-5:][::-1]))
