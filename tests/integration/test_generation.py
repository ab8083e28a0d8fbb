"""``model.generate`` inside a tap: the prompt once, then each fed token at its sequence's seq and pos.

The reference for every generated token is a plain forward over the whole generated batch
(prompt + generated tokens but the last, the same left padding), captured by a second tap: the KV
cache must change nothing but rounding.
"""

import nnsight
import numpy as np
import pytest
import torch
import zarr

import streamtap as st
from streamtap.models import tiny_model

from _util import padded_batch

PER_TOKEN = ("embed", "pos_embed", "z", "mlp_out", "norm_scale", "resid_final")


def _generate(model, store, ids, mask, **kwargs):
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, **kwargs}
    with st.tap(model, store) as tap:
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return out, tap


def _expected(ids, mask, out, eos=2):
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


def _by_sequence(ds):
    seq, pos, tid = ds.seq.values, ds.pos.values, ds.token_id.values
    rows = {}
    for s in np.unique(seq):
        order = np.argsort(pos[seq == s])
        assert list(pos[seq == s][order]) == list(range(order.size)), f"seq {s}: positions not 0..n-1"
        rows[int(s)] = tid[seq == s][order].tolist()
    return rows


def _plain_forward_store(model, out, mask, path):
    """The same sequences through one forward without a cache (the last token is never fed)."""
    full = out[:, :-1]
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], full.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
    with st.tap(model, path), torch.no_grad():
        model(input_ids=full, attention_mask=full_mask)
    return st.open(path)


def _assert_same_terms(generated, plain, rtol=1e-5):
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


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_greedy_left_padded_batch_stores_prompt_then_each_fed_token(arch, tmp_path):
    model = tiny_model(arch)
    ids, mask = padded_batch(model.config.vocab_size, [3, 6, 4], seed=1, side="left")
    out, tap = _generate(model, tmp_path / "gen.zarr", ids, mask, max_new_tokens=5)
    ds = st.open(tmp_path / "gen.zarr")
    want = _expected(ids, mask, out)
    assert _by_sequence(ds) == dict(enumerate(want))
    assert (tap.sequences, tap.tokens) == (3, sum(map(len, want)))
    # appended as computed: the prompt row by row, then one token per sequence per step
    assert list(ds.seq.values[:13]) == [0] * 3 + [1] * 6 + [2] * 4
    assert list(ds.seq.values[13:]) == [0, 1, 2] * 4
    st.verify(ds)
    _assert_same_terms(ds, _plain_forward_store(model, out, mask, tmp_path / "plain.zarr"))


def test_sampling_with_a_seed_matches_the_untapped_run(tmp_path):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [5, 2], seed=3, side="left")
    kwargs = {"max_new_tokens": 6, "do_sample": True, "top_k": 20, "pad_token_id": 0}
    torch.manual_seed(7)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    with st.tap(model, tmp_path / "gen.zarr"):
        torch.manual_seed(7)
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(out, plain)
    ds = st.open(tmp_path / "gen.zarr")
    assert _by_sequence(ds) == dict(enumerate(_expected(ids, mask, out)))
    st.verify(ds)
    _assert_same_terms(ds, _plain_forward_store(model, out, mask, tmp_path / "plain.zarr"))


def test_each_returned_sample_is_its_own_sequence(tmp_path):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [5, 2], seed=3, side="left")
    with st.tap(model, tmp_path / "gen.zarr") as tap:
        torch.manual_seed(1)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True,
                             num_return_sequences=2, pad_token_id=0)
    assert tap.sequences == 4
    ds = st.open(tmp_path / "gen.zarr")
    want = _expected(ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), out)
    assert _by_sequence(ds) == dict(enumerate(want))
    st.verify(ds)


def test_prefill_in_chunks_continues_the_prompt(tmp_path):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [2, 7], seed=8, side="left")
    out, _ = _generate(model, tmp_path / "gen.zarr", ids, mask, max_new_tokens=3, prefill_chunk_size=3)
    ds = st.open(tmp_path / "gen.zarr")
    assert _by_sequence(ds) == dict(enumerate(_expected(ids, mask, out)))
    st.verify(ds)
    _assert_same_terms(ds, _plain_forward_store(model, out, mask, tmp_path / "plain.zarr"))


def test_a_finished_sequence_gets_no_eos_or_padding_terms(tmp_path):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [4, 6], seed=2, side="left")
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    row0, row1 = free[0, ids.shape[1]:].tolist(), free[1, ids.shape[1]:].tolist()
    # make row 0's second generated token its EOS, one that row 1 never produces
    eos = next(t for t in row0[1:] if t not in row1 and t != 0)
    stop = row0.index(eos)
    out, tap = _generate(model, tmp_path / "gen.zarr", ids, mask, max_new_tokens=8, eos_token_id=eos)
    assert (out[0, ids.shape[1] + stop + 1:] == 0).all()  # transformers pads the finished row
    ds = st.open(tmp_path / "gen.zarr")
    got = _by_sequence(ds)
    assert got == dict(enumerate(_expected(ids, mask, out, eos=eos)))
    assert len(got[0]) == 4 + stop and eos not in got[0] and 0 not in got[0]
    assert len(got[1]) == 6 + 8 - 1
    st.verify(ds)
    _assert_same_terms(ds, _plain_forward_store(model, out, mask, tmp_path / "plain.zarr"))


def test_a_step_after_every_sequence_finished_is_not_traced(tmp_path):
    """transformers may run one forward after the last sequence stopped (a deferred stop check, on
    some devices) and drop its result; the tap must store nothing from it."""
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [3, 4], seed=2, side="left")
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 1])
    original = model._has_unfinished_sequences
    extra = []

    def one_step_late(this_peer_finished, synced_gpus, device):
        if this_peer_finished and not extra:
            extra.append(True)
            return True
        return original(this_peer_finished, synced_gpus, device)

    model._has_unfinished_sequences = one_step_late
    try:
        out, _ = _generate(model, tmp_path / "gen.zarr", ids, mask, max_new_tokens=8, eos_token_id=eos)
    finally:
        del model._has_unfinished_sequences
    assert extra  # the extra forward ran
    ds = st.open(tmp_path / "gen.zarr")
    assert _by_sequence(ds) == dict(enumerate(_expected(ids, mask, out[:, :-1], eos=eos)))
    st.verify(ds)


def test_unpadded_batch_and_consecutive_generate_calls_number_sequences_on(tmp_path):
    model = tiny_model("gpt2")
    ids, mask = padded_batch(model.config.vocab_size, [4, 4], seed=5)
    with st.tap(model, tmp_path / "gen.zarr") as tap, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # a plain forward first: sequences 0 and 1
        first = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        second = model.generate(input_ids=ids[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert tap.sequences == 5
    got = _by_sequence(st.open(tmp_path / "gen.zarr"))
    assert got[2] == first[0, :-1].tolist() and got[3] == first[1, :-1].tolist()
    assert got[4] == second[0, :-1].tolist()
    st.verify(st.open(tmp_path / "gen.zarr"))


def test_generate_on_an_appended_store_continues_its_sequence_numbers(tmp_path):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [3, 5], seed=6, side="left")
    _generate(model, tmp_path / "gen.zarr", ids, mask, max_new_tokens=2)
    with st.tap(model, tmp_path / "gen.zarr", append=True) as tap:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert tap.sequences == 2
    got = _by_sequence(st.open(tmp_path / "gen.zarr"))
    assert sorted(got) == [0, 1, 2, 3]
    assert [got[2], got[3]] == _expected(ids, mask, out)


def test_beam_search_is_refused_before_anything_is_captured(tmp_path):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [3, 5], seed=1, side="left")
    with pytest.raises(st.StreamtapError, match="num_beams=1"):
        with st.tap(model, tmp_path / "gen.zarr"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2, pad_token_id=0)
    assert not (tmp_path / "gen.zarr").exists() or st.open(tmp_path / "gen.zarr").sizes["token"] == 0
    assert "generate" not in model.__dict__ and "_get_stopping_criteria" not in model.__dict__
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, num_beams=2, pad_token_id=0)


def test_static_cache_and_cached_plain_forwards_are_refused(tmp_path):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [3, 5], seed=1, side="left")
    with pytest.raises(st.StreamtapError, match="dynamic cache"):
        with st.tap(model, tmp_path / "a.zarr"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0,
                           cache_implementation="static")
    with pytest.raises(st.InputError, match="past_key_values"):
        with st.tap(model, tmp_path / "b.zarr"), torch.no_grad():
            past = model(input_ids=ids[1:]).past_key_values
            model(input_ids=ids[1:, :1], past_key_values=past)


def test_generate_leaves_the_model_as_it_was_and_works_on_an_envoy(tmp_path):
    model = tiny_model("gemma2")
    ids, mask = padded_batch(model.config.vocab_size, [3, 5], seed=4, side="left")
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    envoy = nnsight.NNsight(model)  # the envoy puts its own controller on the model: part of "before"
    before = dict(model.__dict__)
    with st.tap(envoy, tmp_path / "gen.zarr"):
        tapped = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(plain, tapped)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kwargs), plain)
    assert "generate" not in model.__dict__ and "_get_stopping_criteria" not in model.__dict__
    assert sorted(model.__dict__) == sorted(before) and model.__dict__["forward"] is before["forward"]
    st.verify(st.open(tmp_path / "gen.zarr"))


def test_sorting_by_seq_and_pos_is_lazy_and_keeps_the_invariant(tmp_path):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [3, 5], seed=1, side="left")
    out, _ = _generate(model, tmp_path / "gen.zarr", ids, mask, max_new_tokens=4)
    ds = st.open(tmp_path / "gen.zarr").sortby(["seq", "pos"])
    assert ds["z"].chunks is not None and ds["messages"].chunks is not None  # still dask
    assert list(ds.seq.values) == [0] * 6 + [1] * 8
    assert list(ds.token_id.values) == sum(_expected(ids, mask, out), [])
    st.verify(ds)


def test_progress_bar_counts_tokens_with_rate_and_eta(tmp_path, capsys):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [3, 5], seed=1, side="left")
    with st.tap(model, zarr.storage.MemoryStore(), progress=True):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    err = capsys.readouterr().err
    assert "tok/s" in err and "14/14" in err and "<" in err  # tokens done / total, and an ETA


def test_smollm2_generation_float32(tmp_path):
    model, tok = st.models.load_model("smollm2", dtype="float32")
    tok.padding_side = "left"
    prompts = ["The capital of France is", "Water boils at a temperature of"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with st.tap(model, tmp_path / "gen.zarr", tokenizer=tok) as tap:
        out = model.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert " Paris" in tok.decode(out[0, batch["input_ids"].shape[1]:])
    ds = st.open(tmp_path / "gen.zarr")
    want = _expected(batch["input_ids"], batch["attention_mask"], out, eos=tok.eos_token_id)
    assert _by_sequence(ds) == dict(enumerate(want)) and tap.tokens == sum(map(len, want))
    ordered = ds.sortby(["seq", "pos"])
    first = ordered.isel(token=ordered.seq.values == 0)
    assert "".join(map(str, first.text.values)).startswith(prompts[0] + " Paris")
    assert st.verify(ds).attrs["max_rel_error"] <= 1e-5
    _assert_same_terms(ds, _plain_forward_store(model, out, batch["attention_mask"], tmp_path / "plain.zarr"))
