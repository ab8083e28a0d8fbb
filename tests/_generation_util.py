"""What a store written inside ``model.generate`` must hold, and the plain forward it must equal."""

from __future__ import annotations

import numpy as np
import torch

import streamtap as st

PER_TOKEN = ("embed", "pos_embed", "z", "mlp_out", "norm_scale", "resid_final")


def generate_in_tap(model, store, ids, mask, **kwargs):
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, **kwargs}
    with st.tap(model, store) as tap:
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return out, tap


def expected(ids, mask, out, eos=2):
    """Per row, the token ids a generate store must hold: real prompt + generated[:-1], cut after
    the EOS (2 in the tiny models' generation config) that ends the sequence."""
    rows = []
    for i in range(ids.shape[0]):
        prompt = ids[i][mask[i].bool()].tolist()
        new = out[i, ids.shape[1]:].tolist()
        if eos is not None and eos in new:
            new = new[:new.index(eos) + 1]  # the sequence ends with its EOS, which is never fed back
        rows.append(prompt + new[:-1])
    return rows


def by_sequence(ds):
    seq, pos, tid = ds.seq.values, ds.pos.values, ds.token_id.values
    rows = {}
    for s in np.unique(seq):
        order = np.argsort(pos[seq == s])
        assert list(pos[seq == s][order]) == list(range(order.size)), f"seq {s}: positions not 0..n-1"
        rows[int(s)] = tid[seq == s][order].tolist()
    return rows


def plain_forward_store(model, out, mask, path):
    """The same sequences through one forward without a cache (the last token is never fed)."""
    full = out[:, :-1]
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], full.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    with st.tap(model, path), torch.no_grad():
        model(input_ids=full, attention_mask=full_mask)
    return st.open(path)


def assert_same_terms(generated, plain, rtol=1e-5):
    """Every generated-store token equals the plain-forward token with the same seq and pos."""
    key = {(int(s), int(p)): i for i, (s, p) in enumerate(zip(plain.seq.values, plain.pos.values))}
    index = [key[(int(s), int(p))] for s, p in zip(generated.seq.values, generated.pos.values)]
    matched = plain.isel(token=index)
    np.testing.assert_array_equal(generated.token_id.values, matched.token_id.values)
    for name in PER_TOKEN:
        if name not in generated:
            continue
        a, b = generated[name].values.astype(np.float64), matched[name].values.astype(np.float64)
        scale = np.abs(b).max()
        assert np.abs(a - b).max() <= rtol * scale, f"{name}: {np.abs(a - b).max():.3g} vs scale {scale:.3g}"
