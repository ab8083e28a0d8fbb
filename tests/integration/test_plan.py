"""streamtap.plan: the bytes per token it plans are the bytes a capture writes; the free-space refusal;
the command line's fields."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import namedtuple

import pytest
import torch
import zarr

import streamtap as st
from streamtap.models import tiny_model
from streamtap.io.schema import itemsize
from streamtap.planning import COORD_BYTES
from tests._cli_util import fields, invoke, number

GIVEN = dict(disk_bandwidth=1e9, forward_rate=1e4)   # no disk probe, no timed forward


def written_per_token(path) -> dict[str, int]:
    """Bytes per token of every per-token array the capture wrote (the text coordinate aside)."""
    group = zarr.open_group(path, mode="r")
    return {name: math.prod(a.shape[1:]) * a.dtype.itemsize for name, a in group.arrays()
            if a.metadata.dimension_names and a.metadata.dimension_names[0] == "token" and name != "text"}


def capture(model, path, **options):
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with st.tap(model, path, **options):
        model(input_ids=ids)


CASES = [("llama", {}), ("llama", {"neurons": True}), ("llama", {"patterns": True}),
         ("gpt2", {"store_dtype": "bfloat16"}), ("gpt2", {"patterns": True}), ("bloom", {"patterns": True}),
         ("mixtral", {}), ("qwen2_moe", {}), ("gemma3", {"patterns": True}),
         # selections, sized from a one-sequence capture of the same options
         ("llama", {"layers": [1], "heads": [0, 2]}), ("gpt2", {"terms": ("z",), "project": {"a": 5}}),
         ("gpt2", {"project": {"a": 5, "unembed_top": 2}}), ("mixtral", {"layers": [0]}),
         ("llama", {"positions": "last:3", "layers": [0]})]


@pytest.mark.parametrize("arch,options", CASES, ids=[f"{a}-{'-'.join(o) or 'full'}" for a, o in CASES])
def test_planned_bytes_per_token_are_the_written_ones(tmp_path, arch, options):
    model = tiny_model(arch)
    planned = st.plan(model, 1000, **GIVEN, **options)
    capture(model, tmp_path / "s.zarr", **options)
    written = written_per_token(tmp_path / "s.zarr")
    coords = {n: written.pop(n) for n in ("seq", "pos", "token_id")}
    assert {n: math.prod(v.tail) * itemsize(v.dtype) for n, v in planned.variables.items()} == written
    assert sum(coords.values()) == COORD_BYTES
    assert planned.bytes_per_token == sum(written.values()) + sum(coords.values())


def test_positions_plan_the_share_of_tokens_they_keep():
    """``positions`` keeps K of every sequence: the plan counts ``tokens`` x K / seq_len stored tokens."""
    model = tiny_model("llama")
    full, last = (st.plan(model, 1024, seq_len=64, **GIVEN, **o) for o in ({}, {"positions": "last:4"}))
    assert last.stored_tokens == 64 and full.stored_tokens == 1024
    assert last.total_bytes - last.weights == 64 * last.bytes_per_token
    assert "64 stored (positions last:4 of sequences of 64 tokens)" in dict(last.rows())["tokens"]


def test_a_selection_of_a_config_planned_unloaded_is_refused():
    with pytest.raises(st.InputError, match="needs the model loaded"):
        st.plan("llama-3-8b", 1000, **GIVEN, layers=[0])


def test_a_config_planned_unloaded_is_planned_as_the_loaded_model(tmp_path):
    """The meta-device model (no weights) binds to the same shapes as the loaded one."""
    model = tiny_model("llama")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(model.config.to_dict()))
    unloaded = st.plan(str(path), 1000, neurons=True, **GIVEN)
    loaded = st.plan(model, 1000, neurons=True, **GIVEN)
    assert unloaded.variables == loaded.variables
    assert unloaded.forward_source == "given"


def test_8b_plan_is_disk_bound_at_half_a_mebibyte_per_token():
    plan = st.plan("llama-3-8b", 10**8, disk_bandwidth=2e9)
    assert plan.variables["z"].dtype == "bfloat16"
    assert 0.5 * 2**20 < plan.bytes_per_token < 0.53 * 2**20
    assert plan.bound == "disk" and "400 TFLOP/s" in plan.forward_source
    assert plan.suggestions() == []   # no budget, nothing to fit


def test_budget_suggestions_fit_the_budget():
    plan = st.plan("llama-3-8b", 10**7, disk_bandwidth=2e9, budget_size=2e12)
    allowed = (2e12 - plan.weights) / 10**7
    ideas = plan.suggestions()
    layers = next(i for i in ideas if "layers" in i)
    assert number(layers.split(": ")[-1]) <= allowed
    assert any("project=" in i for i in ideas)


def test_bad_option_and_tokens_are_refused_by_name():
    model = tiny_model("llama")
    with pytest.raises(st.OptionError, match="neuron"):
        st.plan(model, 10, neuron=True, **GIVEN)
    with pytest.raises(st.InputError, match="tokens=0"):
        st.plan(model, 0, **GIVEN)
    with pytest.raises(st.InputError, match="known id"):
        st.plan("no-such-model", 10, **GIVEN)


def test_measured_disk_bandwidth_leaves_nothing_behind(tmp_path):
    from streamtap.planning import measure_disk

    assert measure_disk(tmp_path, size=16 << 20) > 0
    assert os.listdir(tmp_path) == []


Usage = namedtuple("Usage", "total used free")


def small_disk(monkeypatch, free: int) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(real(p).total, real(p).used, free))


def test_capture_refuses_a_target_without_the_free_space(tmp_path, monkeypatch):
    model = tiny_model("llama")
    ids = [[1, 2, 3, 4, 5, 6]] * 4
    need = 24 * st.plan(model, 1, **GIVEN).bytes_per_token + sum(p.numel() * 4 for p in model.parameters())
    small_disk(monkeypatch, need - 1)
    with pytest.raises(st.StoreFullError) as info:
        st.capture(model, ids, tmp_path / "s.zarr", batch_size=2)
    message = str(info.value)
    assert f"{need:,} bytes" in message and f"{need - 1:,} bytes" in message and "ignore_free_space" in message
    assert not (tmp_path / "s.zarr").exists()
    small_disk(monkeypatch, need)
    st.capture(model, ids, tmp_path / "s.zarr", batch_size=2)
    assert st.open(tmp_path / "s.zarr").sizes["token"] == 24


def test_ignore_free_space_overrides_the_refusal(tmp_path, monkeypatch):
    small_disk(monkeypatch, 1)
    st.capture(tiny_model("llama"), [[1, 2, 3]], tmp_path / "s.zarr", ignore_free_space=True)
    assert st.open(tmp_path / "s.zarr").sizes["token"] == 3


def test_cli_plan_fields():
    result = invoke("plan", "--model", "tiny:llama", "--tokens", 10**6, "--disk-bandwidth", "1G", "--neurons",
                    "--budget-size", "1G")
    assert result.exit_code == 0, result.output
    out = fields(result.output)
    assert number(out["tokens"]) == 10**6
    expected = st.plan(tiny_model("llama"), 1, neurons=True, **GIVEN).bytes_per_token
    assert number(out["bytes/token"]) == expected
    assert out["disk"].startswith("1.00 GB/s (given)")
    assert "tokens/s (timed: 3 forwards of 8 x 256 on cpu)" in out["forward"]
    assert out["bound"].split()[0] in ("disk", "forward")
    assert out["budget"] == "size 953.7 MiB: exceeded" and "to fit" in out


def test_cli_plan_of_a_config_states_its_assumption():
    result = invoke("plan", "--config", "llama-3-8b", "--tokens", 10**8, "--disk-bandwidth", "2G",
                    "--device-flops", "400T", "--budget-time", "24h")
    assert result.exit_code == 0, result.output
    out = fields(result.output)
    assert "assumed: 2 x 8.03e9 parameters FLOPs/token at 400 TFLOP/s" in out["forward"]
    assert out["bound"].startswith("disk")
    bad = invoke("plan", "--config", "llama-3-8b", "--tokens", 10, "--budget-size", "lots")
    assert bad.exit_code == 2 and "'lots': expected bytes" in bad.output


def test_cli_capture_prints_the_planned_size_first(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("one two three four\nfive six seven\n")
    result = invoke("capture", "--model", "tiny:llama", "--text", text, "--out", tmp_path / "s.zarr")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stderr.splitlines() if x.startswith("streamtap: plan:"))
    tokens = st.open(tmp_path / "s.zarr").sizes["token"]
    assert f"plan: {tokens:,} tokens x " in line


def test_a_selective_capture_is_sized_as_plan_sizes_it(tmp_path, monkeypatch, capsys):
    """positions="last" stores one token of each row: a target too small for the full store but large enough
    for the selected one takes the capture, and the plan it prints is st.plan's bytes per token."""
    model = tiny_model("llama")
    ids = [[1, 2, 3, 4, 5, 6]] * 4
    weights = sum(p.numel() * 4 for p in model.parameters())
    full = 24 * st.plan(model, 1, **GIVEN).bytes_per_token + weights
    per_token = st.plan(model, 24, positions="last", **GIVEN).bytes_per_token
    need = 4 * per_token + weights
    assert need < full
    small_disk(monkeypatch, need)
    st.capture(model, ids, tmp_path / "s.zarr", batch_size=2, positions="last", progress=True)
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("streamtap: plan:"))
    assert f"plan: 24 tokens (4 stored) x {per_token:,} bytes/token " in line
    assert st.open(tmp_path / "s.zarr").sizes["token"] == 4
    assert sum(written_per_token(tmp_path / "s.zarr").values()) == per_token   # the coordinates included
    small_disk(monkeypatch, need - 1)
    with pytest.raises(st.StoreFullError, match=f"{need:,} bytes"):
        st.capture(model, ids, tmp_path / "t.zarr", batch_size=2, positions="last")
    assert not (tmp_path / "t.zarr").exists()
