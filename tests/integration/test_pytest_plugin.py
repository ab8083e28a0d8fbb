"""The pytest plugin and streamtap.testing: stores verify as pytest items, assertions fail readably."""

import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
import zarr

import streamtap as st
import streamtap.models
from streamtap.testing import assert_terms_sum_to_residual

pytest_plugins = ["pytester"]

LENGTHS = [5, 3, 4]  # seq 0 is tokens 0-4, seq 1 tokens 5-7, seq 2 tokens 8-11
SEQ0_LAST_AND_SEQ1_FIRST = slice(4, 6)


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """One small store (with neuron activations), made once; tests copy it before damaging it."""
    model = streamtap.models.tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    lists = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]
    path = tmp_path_factory.mktemp("captured") / "run.zarr"
    st.capture(model, lists, path, neurons=True, batch_size=2)
    # also imports, in this process, everything the in-process pytest runs below use: pytester
    # drops modules first imported inside such a run, and re-importing them each time is slow
    st.verify(st.open(path))
    assert_terms_sum_to_residual(path, neurons=True)
    return path


def _copy(captured, where, name="run.zarr"):
    target = where / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(captured, target)
    return target


def _damage(path, variable="mlp_out", rows=SEQ0_LAST_AND_SEQ1_FIRST, value=0.0):
    zarr.open_group(path, mode="r+")[variable][rows] = value


# -- --streamtap-verify ----------------------------------------------------------------------------
def test_each_sequence_is_a_passing_item_and_a_dir_without_tests_exits_0(pytester, captured):
    _copy(captured, pytester.path)
    result = pytester.runpytest_inprocess("--streamtap-verify", "run.zarr", "-v")
    result.assert_outcomes(passed=1 + len(LENGTHS))  # the store as a whole, then each sequence
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["run.zarr::store PASSED*"] + [f"run.zarr::seq?{i}? PASSED*" for i in range(len(LENGTHS))])


def test_collect_only_lists_the_store_and_one_node_id_per_sequence(pytester, captured):
    _copy(captured, pytester.path)
    result = pytester.runpytest_inprocess("--streamtap-verify", "run.zarr", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    ids = [line for line in result.outlines if line.startswith("run.zarr")]
    assert ids == ["run.zarr::store"] + [f"run.zarr::seq[{i}]" for i in range(len(LENGTHS))]


def test_damaged_store_fails_exactly_the_damaged_sequences(pytester, captured):
    _damage(_copy(captured, pytester.path))
    result = pytester.runpytest_inprocess("--streamtap-verify", "run.zarr", "-rf", "--junitxml=out.xml")
    result.assert_outcomes(failed=2, passed=2)  # the store is whole; two sequences do not add up
    result.stdout.fnmatch_lines([
        "*streamtap store run.zarr, seq 0: 1 of 5 tokens miss the invariant",
        "*tolerance 1e-05 for float32*",
        "*pos*token_id*rel_error*abs_error",
        "* 4 * 91 *e-01 *e+01",
        "*streamtap store run.zarr, seq 1: 1 of 3 tokens miss the invariant",
        "FAILED run.zarr::seq?0?*",
        "FAILED run.zarr::seq?1?*",
    ])
    cases = ET.parse(pytester.path / "out.xml").getroot().iter("testcase")
    failed = {c.get("name") for c in cases if c.find("failure") is not None}
    assert failed == {"seq[0]", "seq[1]"}


def test_x_k_and_lf_select_items_like_any_tests(pytester, captured):
    _damage(_copy(captured, pytester.path))
    pytester.runpytest_inprocess("--streamtap-verify", "run.zarr", "-x").assert_outcomes(failed=1, passed=1)
    selected = pytester.runpytest_inprocess("--streamtap-verify", "run.zarr", "-k", "seq[2]")
    selected.assert_outcomes(passed=1, deselected=3)
    pytester.runpytest_inprocess("--streamtap-verify", "run.zarr").assert_outcomes(failed=2, passed=2)
    last_failed = pytester.runpytest_inprocess("--streamtap-verify", "run.zarr", "--lf")
    last_failed.assert_outcomes(failed=2, deselected=2)


def test_store_is_checked_alongside_tests_even_in_a_norecursedirs_folder(pytester, captured):
    # ".runs" matches pytest's default norecursedirs ".*": a store there must still be verified,
    # and pytest's own walk must not collect it a second time
    _copy(captured, pytester.path / ".runs")
    _copy(captured, pytester.path, name="also.zarr")
    pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    result = pytester.runpytest_inprocess("--streamtap-verify", ".runs/run.zarr", "--streamtap-verify", "also.zarr")
    result.assert_outcomes(passed=1 + 2 * (1 + len(LENGTHS)))


def test_with_patterns_each_sequence_checks_the_second_invariant_too(pytester, captured):
    """A store with patterns whose rotary table is wrong for seq 1: the residual still sums (positions
    do not enter it), but seq 1's head outputs no longer equal its patterns times its values."""
    model = streamtap.models.tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    lists = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]
    path = pytester.path / "run.zarr"
    st.capture(model, lists, path, patterns=True, batch_size=2)
    pytester.runpytest_inprocess("--streamtap-verify", "run.zarr").assert_outcomes(passed=1 + len(LENGTHS))
    group = zarr.open_group(path, mode="r+")
    group["rotary_sin"][5:8] = -group["rotary_sin"][5:8]          # seq 1 turned the other way
    result = pytester.runpytest_inprocess("--streamtap-verify", "run.zarr", "-rf")
    result.assert_outcomes(failed=1, passed=len(LENGTHS))
    result.stdout.fnmatch_lines(["*seq 1: * head outputs miss the second invariant*",
                                 "*head output at i = sum_j A?i, j? ? v_j*", "FAILED run.zarr::seq?1?*"])


def test_a_lost_coordinate_chunk_fails_the_store_item_and_names_it(pytester, captured):
    # a deleted chunk reads back as fill values (token_id -1, seq -1): no error from zarr, so without
    # the store item the run would collect fewer sequences and pass
    import glob
    import os

    path = _copy(captured, pytester.path)
    for chunk in glob.glob(os.path.join(path, "seq", "c", "*")):
        os.remove(chunk)
    result = pytester.runpytest_inprocess("--streamtap-verify", "run.zarr", "-rf")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*streamtap store run.zarr is damaged (1 problem):",
                                 "*seq: no value (the fill value*(tokens 0..11)"])


# -- assert_terms_sum_to_residual -------------------------------------------------------------------
def test_assertion_passes_on_an_intact_store_from_path_or_dataset(captured):
    for given in (captured, str(captured), st.open(captured)):
        err = assert_terms_sum_to_residual(given)
        assert err.sizes["token"] == sum(LENGTHS)
        assert err.attrs["max_rel_error"] <= err.attrs["tolerance"] == 1e-5


def test_assertion_names_the_worst_tokens_error_and_tolerance(captured, tmp_path):
    path = _copy(captured, tmp_path)
    _damage(path)
    with pytest.raises(AssertionError) as info:
        assert_terms_sum_to_residual(path)
    message = str(info.value)
    assert "2 of 12 tokens in 2 sequence(s) [0, 1] exceed tolerance 1e-05" in message
    assert "seq 0 pos 4: rel " in message and "seq 1 pos 0: rel " in message
    # a caller-given tolerance is the one applied and reported
    with pytest.raises(AssertionError, match="exceed tolerance 1e-09"):
        assert_terms_sum_to_residual(captured, tol=1e-9)


def test_assertion_seq_filter(captured, tmp_path):
    path = _copy(captured, tmp_path)
    _damage(path)
    assert_terms_sum_to_residual(path, seq=2)
    with pytest.raises(AssertionError, match=r"1 of 7 tokens in 1 sequence\(s\) \[1\]"):
        assert_terms_sum_to_residual(path, seq=[1, 2])
    with pytest.raises(AssertionError, match=r"no tokens for seq \[7\].*0\.\.2"):
        assert_terms_sum_to_residual(path, seq=[2, 7])


def test_assertion_neurons_checks_the_per_neuron_terms_too(captured, tmp_path):
    path = _copy(captured, tmp_path)
    _damage(path, "neuron_act", rows=slice(9, 10))  # seq 2 pos 1; mlp_out is untouched
    assert_terms_sum_to_residual(path)
    with pytest.raises(AssertionError, match=r"per-neuron terms do not sum.*\[2\].*seq 2 pos 1"):
        assert_terms_sum_to_residual(path, neurons=True)


def test_assertion_fails_on_nan_which_compares_false_with_any_tolerance(captured, tmp_path):
    path = _copy(captured, tmp_path)
    _damage(path, rows=slice(0, 1), value=np.nan)
    with pytest.raises(AssertionError, match=r"1 of 12 tokens \(1 of them NaN.*seq 0 pos 0: rel nan"):
        assert_terms_sum_to_residual(path)


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("streamtap_tiny_model", ["gpt2", "llama"], indirect=True)
def test_the_tiny_model_fixture_by_arch_and_the_store_factory(streamtap_tiny_model, streamtap_store, request):
    assert streamtap_tiny_model.config.model_type == request.node.callspec.params["streamtap_tiny_model"]
    ds = streamtap_store(streamtap_tiny_model, [[5, 6, 7], [8, 9]], batch_size=1)
    assert ds.sizes["token"] == 5 and list(ds.seq.values) == [0, 0, 0, 1, 1]
    assert_terms_sum_to_residual(ds)


def test_the_tiny_model_fixture_defaults_to_llama_and_its_factory_is_the_library_function(
        streamtap_tiny_model, streamtap_tiny_model_factory):
    assert streamtap_tiny_model.config.model_type == "llama"
    assert streamtap_tiny_model_factory is streamtap.models.tiny_model


def test_store_factory_runs_padded_batches_as_given(streamtap_tiny_model, streamtap_store):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    ds = streamtap_store(streamtap_tiny_model, {"input_ids": ids, "attention_mask": mask},
                         store=zarr.storage.MemoryStore(), neurons=True)
    assert ds.sizes["token"] == 6 and ds.attrs["neurons"]
    assert_terms_sum_to_residual(ds, neurons=True)
