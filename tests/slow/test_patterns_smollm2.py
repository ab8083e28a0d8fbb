"""Patterns on the real SmolLM2-135M: a padded capture (SDPA, as the model loads) with ``patterns=True``
against the same model's eager attention probabilities, float32. (Every tiny architecture:
tests/integration/test_patterns.py.)"""

import numpy as np
import pytest
import torch

import streamtap as st
import streamtap.attention
from streamtap.models import load_model

SENTENCES = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Water boils at a temperature of one hundred degrees",
    "A cat sat on the mat.",
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    model, tok = load_model()
    path = tmp_path_factory.mktemp("smol-patterns") / "run.zarr"
    st.capture(model, SENTENCES, path, tokenizer=tok, batch_size=3, patterns=True)
    return path, tok


def test_patterns_equal_eager_attention(store):
    path, tok = store
    ds = st.open(path)
    assert ds.attrs["patterns"] and ds.attrs["layout"] == "llama"
    assert ds.rotary_cos.sizes["rope"] == 1 and ds.attrs["n_layers"] == 30
    eager, _ = load_model(attn_implementation="eager")  # never tapped: its attentions are recorded once
    assert eager.config._attn_implementation == "eager"
    for seq, text in enumerate(SENTENCES):
        A = st.analysis.attention(ds, seq)
        ids = A.query_token_id.values.tolist()
        assert ids == tok(text)["input_ids"] and len(ids) > 5
        with torch.no_grad():
            out = eager(input_ids=torch.tensor([ids]), output_attentions=True)
        ref = torch.stack([a[0] for a in out.attentions]).double().numpy()   # (layer, head, query, key)
        assert A.shape == ref.shape == (30, 9, len(ids), len(ids))
        error = float(np.abs(A.values - ref).max())
        assert error <= 1e-5, f"sequence {seq}: pattern differs from eager attention by {error:.3g}"


def test_the_second_invariant_holds(store):
    path, _ = store
    ds = st.open(path)
    err = st.verify(ds)
    assert err.attrs["max_rel_error"] <= 1e-5 and err.attrs["max_output_error"] <= st.tolerance(ds) == 1e-5
    assert float(streamtap.attention.output_errors(ds, 2).max()) <= 1e-5
