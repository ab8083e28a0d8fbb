"""Attention patterns of the masked-LM encoders beyond BERT and RoBERTa (layouts/bert.py), recomputed
from a store against the model's own eager ``output_attentions`` on a right-padded batch, within 1e-5
in float32 (the method and helpers of test_patterns.py). ModernBERT also shows that its two-sided
sliding window and its first layer's identity norm are each needed. ALBERT is refused by name."""

from __future__ import annotations

import pytest
import torch
import transformers
import zarr

import streamtap as st
from streamtap.layouts import layout_candidates

from _util import padded_batch
from test_patterns import LENGTHS, check_store, pattern_error, tapped

_SIZES = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=64, initializer_range=0.2, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
ENCODERS = {
    "xlm-roberta": ("XLMRobertaConfig", _SIZES),
    "camembert": ("CamembertConfig", _SIZES),
    "data2vec-text": ("Data2VecTextConfig", _SIZES),
    "electra": ("ElectraConfig", {**_SIZES, "embedding_size": 64}),
    "electra-projected": ("ElectraConfig", {**_SIZES, "embedding_size": 32}),
    "distilbert": ("DistilBertConfig", dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                            max_position_embeddings=64, initializer_range=0.2, dropout=0.0,
                                            attention_dropout=0.0)),
    # layer 0 global with an identity attention norm, layer 1 local: a key within 2 positions either side
    "modernbert": ("ModernBertConfig", dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=64, local_attention=4,
                                            global_attn_every_n_layers=2, initializer_range=0.2, pad_token_id=0,
                                            bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                                            mask_token_id=3)),
}


def encoder(name: str):
    """A tiny masked LM of ``name``, eager, with random biases and perturbed constant parameters (so a
    dropped bias or norm weight would show)."""
    config_class, fields = ENCODERS[name]
    config = getattr(transformers, config_class)(**fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForMaskedLM.from_config(config, attn_implementation="eager")
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("bias") or bool((p == p.flatten()[0]).all()):
                    p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_patterns_equal_eager_attention(name):
    model = encoder(name)
    ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=1, side="right")
    ids[ids < 4] += 4   # no special token (pad, cls, sep, mask) inside a sequence
    ids[mask == 0] = model.config.pad_token_id
    ds, attentions = tapped(model, ids, mask)
    assert not ds.attrs["causal"] and len(attentions) == ds.sizes["layer"]
    check_store(ds, attentions, ids, mask)
    if name == "modernbert":
        assert ds.attrs["attn_window"] == [None, 3] and ds.attrs["attn_norm_identity"] == [0]
        for broken in ({"attn_window": [None, None]}, {"attn_norm_identity": []}):
            missed = pattern_error(ds.assign_attrs(**broken), attentions, ids, mask)
            assert missed > 1e-3, f"the pattern does not depend on {broken} ({missed:.3g})"


def test_albert_is_refused_naming_its_shared_layer(tmp_path):
    config = transformers.AlbertConfig(vocab_size=96, embedding_size=32, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=128)
    model = transformers.AlbertForMaskedLM(config).eval()
    with pytest.raises(st.UnsupportedArchitectureError, match="albert.*one shared layer"):
        layout_candidates(model)   # refused by name: no layout is inferred for it
    with pytest.raises(st.UnsupportedArchitectureError, match="one shared layer"):
        with st.tap(model, zarr.storage.LocalStore(str(tmp_path / "s.zarr"))):
            pass
    assert not (tmp_path / "s.zarr").exists()


def test_an_identity_norm_probes_as_scale_one_and_is_refused_in_the_stream():
    from dataclasses import replace

    from streamtap.layouts import Norm, bind, layout_for
    from streamtap.layouts.norms import probe_norm

    probe = probe_norm(torch.nn.Identity(), 8)   # was a ZeroDivisionError measuring its epsilon
    assert probe["identity"] and not probe["center"]
    assert torch.equal(probe["gamma"], torch.ones(8)) and torch.equal(probe["beta"], torch.zeros(8))
    assert not probe_norm(torch.nn.LayerNorm(8), 8).get("identity")
    model = encoder("modernbert")
    layout = layout_for(model)
    bind(layout, model)   # the identity as the first layer's attention norm is fine
    wrong = replace(layout, after_embeds=(*layout.after_embeds, Norm("layers.0.attn_norm")))
    with pytest.raises(st.LayoutError, match="layers.0.attn_norm .* is an identity"):
        bind(wrong, model)
