"""``model.generate`` inside a tap: the prompt once, then each fed token at its sequence's seq and pos.

The reference for every generated token is a plain forward over the whole generated batch
(prompt + generated tokens but the last, the same left padding), captured by a second tap: the KV
cache must change nothing but rounding. (On SmolLM2: tests/slow/test_smollm2.py.)
"""

import nnsight
import pytest
import torch
import zarr

import streamtap as st
from streamtap.models import tiny_model

from _generation_util import assert_same_terms, by_sequence, expected, generate_in_tap, plain_forward_store
from _util import padded_batch


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_greedy_left_padded_batch_stores_prompt_then_each_fed_token(arch, tmp_path):
    model = tiny_model(arch)
    ids, mask = padded_batch(model.config.vocab_size, [3, 6, 4], seed=1, side="left")
    out, tap = generate_in_tap(model, tmp_path / "gen.zarr", ids, mask, max_new_tokens=5)
    ds = st.open(tmp_path / "gen.zarr")
    want = expected(ids, mask, out)
    assert by_sequence(ds) == dict(enumerate(want))
    assert (tap.sequences, tap.tokens) == (3, sum(map(len, want)))
    # appended as computed: the prompt row by row, then one token per sequence per step
    assert list(ds.seq.values[:13]) == [0] * 3 + [1] * 6 + [2] * 4
    assert list(ds.seq.values[13:]) == [0, 1, 2] * 4
    st.verify(ds)
    assert_same_terms(ds, plain_forward_store(model, out, mask, tmp_path / "plain.zarr"))


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
    assert by_sequence(ds) == dict(enumerate(expected(ids, mask, out)))
    st.verify(ds)
    assert_same_terms(ds, plain_forward_store(model, out, mask, tmp_path / "plain.zarr"))


def test_each_returned_sample_is_its_own_sequence(tmp_path):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [5, 2], seed=3, side="left")
    with st.tap(model, tmp_path / "gen.zarr") as tap:
        torch.manual_seed(1)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=True,
                             num_return_sequences=2, pad_token_id=0)
    assert tap.sequences == 4
    ds = st.open(tmp_path / "gen.zarr")
    want = expected(ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), out)
    assert by_sequence(ds) == dict(enumerate(want))
    st.verify(ds)


def test_prefill_in_chunks_continues_the_prompt(tmp_path):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [2, 7], seed=8, side="left")
    out, _ = generate_in_tap(model, tmp_path / "gen.zarr", ids, mask, max_new_tokens=3, prefill_chunk_size=3)
    ds = st.open(tmp_path / "gen.zarr")
    assert by_sequence(ds) == dict(enumerate(expected(ids, mask, out)))
    st.verify(ds)
    assert_same_terms(ds, plain_forward_store(model, out, mask, tmp_path / "plain.zarr"))


def test_a_finished_sequence_gets_no_eos_or_padding_terms(tmp_path):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [4, 6], seed=2, side="left")
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    row0, row1 = free[0, ids.shape[1]:].tolist(), free[1, ids.shape[1]:].tolist()
    # make row 0's second generated token its EOS, one that row 1 never produces
    eos = next(t for t in row0[1:] if t not in row1 and t != 0)
    stop = row0.index(eos)
    out, tap = generate_in_tap(model, tmp_path / "gen.zarr", ids, mask, max_new_tokens=8, eos_token_id=eos)
    assert (out[0, ids.shape[1] + stop + 1:] == 0).all()  # transformers pads the finished row
    ds = st.open(tmp_path / "gen.zarr")
    got = by_sequence(ds)
    assert got == dict(enumerate(expected(ids, mask, out, eos=eos)))
    assert len(got[0]) == 4 + stop and eos not in got[0] and 0 not in got[0]
    assert len(got[1]) == 6 + 8 - 1
    st.verify(ds)
    assert_same_terms(ds, plain_forward_store(model, out, mask, tmp_path / "plain.zarr"))


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
        out, _ = generate_in_tap(model, tmp_path / "gen.zarr", ids, mask, max_new_tokens=8, eos_token_id=eos)
    finally:
        del model._has_unfinished_sequences
    assert extra  # the extra forward ran
    ds = st.open(tmp_path / "gen.zarr")
    assert by_sequence(ds) == dict(enumerate(expected(ids, mask, out[:, :-1], eos=eos)))
    st.verify(ds)


def test_unpadded_batch_and_consecutive_generate_calls_number_sequences_on(tmp_path):
    model = tiny_model("gpt2")
    ids, mask = padded_batch(model.config.vocab_size, [4, 4], seed=5)
    with st.tap(model, tmp_path / "gen.zarr") as tap, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # a plain forward first: sequences 0 and 1
        first = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        second = model.generate(input_ids=ids[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert tap.sequences == 5
    got = by_sequence(st.open(tmp_path / "gen.zarr"))
    assert got[2] == first[0, :-1].tolist() and got[3] == first[1, :-1].tolist()
    assert got[4] == second[0, :-1].tolist()
    st.verify(st.open(tmp_path / "gen.zarr"))


def test_generate_on_an_appended_store_continues_its_sequence_numbers(tmp_path):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [3, 5], seed=6, side="left")
    generate_in_tap(model, tmp_path / "gen.zarr", ids, mask, max_new_tokens=2)
    with st.tap(model, tmp_path / "gen.zarr", append=True) as tap:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert tap.sequences == 2
    got = by_sequence(st.open(tmp_path / "gen.zarr"))
    assert sorted(got) == [0, 1, 2, 3]
    assert [got[2], got[3]] == expected(ids, mask, out)


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
    out, _ = generate_in_tap(model, tmp_path / "gen.zarr", ids, mask, max_new_tokens=4)
    ds = st.open(tmp_path / "gen.zarr").sortby(["seq", "pos"])
    assert ds["z"].chunks is not None and ds["head_output"].chunks is not None  # still dask
    assert list(ds.seq.values) == [0] * 6 + [1] * 8
    assert list(ds.token_id.values) == sum(expected(ids, mask, out), [])
    st.verify(ds)


def test_progress_bar_counts_tokens_with_rate_and_eta(tmp_path, capsys):
    model = tiny_model("llama")
    ids, mask = padded_batch(model.config.vocab_size, [3, 5], seed=1, side="left")
    with st.tap(model, zarr.storage.MemoryStore(), progress=True):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    err = capsys.readouterr().err
    assert "tok/s" in err and "14/14" in err and "<" in err  # tokens done / total, and an ETA
