"""The command line, end to end: capture, verify, info and demo, on tiny models. (On SmolLM2 and a Ctrl-C
in a child process: tests/slow.)"""

import re

import pytest
import zarr

from _cli_util import error_line, fields, invoke, number
from _util import lock_exists, plant_lock

DOCS = [
    "the quick brown fox jumps over the lazy dog",
    "a stream of residual terms adds up to the final state",
    "heads write messages and mlps write features",
    "short one",
]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(DOCS[:2] + [""] + DOCS[2:]) + "\n")  # a blank line is skipped
    return path


def capture(text_file, out, *extra, arch="llama"):
    return invoke("capture", "--model", f"tiny:{arch}", "--text", text_file, "--out", out, "--batch-size", 3, *extra)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_capture_verify_info(arch, text_file, tmp_path):
    out = tmp_path / "run.zarr"
    result = capture(text_file, out, arch=arch)
    assert result.exit_code == 0, result.output
    got = fields(result.stdout)
    n_tokens = number(got["tokens"])
    assert n_tokens == sum(len(d.split()) for d in DOCS) and number(got["sequences"]) == len(DOCS)
    assert float(got["seconds"]) > 0 and number(got["tokens/s"]) > 0 and got["store"] == str(out)
    assert "tok/s" in result.stderr  # the progress bar reports the rate

    result = invoke("verify", out)
    assert result.exit_code == 0, result.output
    got = fields(result.stdout)
    assert number(got["tokens"]) == n_tokens and got["invariant"] == "ok"
    assert float(got["max rel error"]) <= float(got["tolerance"]) == 1e-5
    assert float(got["max abs error"]) >= 0

    result = invoke("info", out)
    assert result.exit_code == 0, result.output
    got = fields(result.stdout)
    assert got["model"] == f"tiny:{arch}" and got["layout"].startswith(arch) and got["dtype"] == "float32"
    for key in ("layers", "heads", "d_head", "d_model"):
        assert number(got[key]) > 0
    assert number(got["tokens"]) == n_tokens and number(got["sequences"]) == len(DOCS)
    assert re.match(r"[\d.]+ (B|KiB|MiB)", got["on disk"]) and re.match(r"[\d.]+ (B|KiB|MiB) over the committed tokens", got["data"])
    assert re.fullmatch(r"per-token arrays raw; static weights Blosc zstd-1, [\d.]+x", got["compression"])
    assert "tolerance 1e-05: ok" in got["max error"]
    assert got["schema"].startswith("1 ") and "streamtap 0.1.0" in got["schema"]


def test_existing_store_needs_append_or_overwrite(text_file, tmp_path):
    out = tmp_path / "run.zarr"
    assert capture(text_file, out).exit_code == 0
    result = capture(text_file, out)
    assert result.exit_code == 2
    assert error_line(result).startswith("error: ") and "--append" in result.stderr and "--overwrite" in result.stderr
    assert "Traceback" not in result.output

    result = capture(text_file, out, "--append", "--overwrite")
    assert result.exit_code == 2 and "exclude each other" in result.stderr


def test_append_adds_tokens_and_overwrite_replaces(text_file, tmp_path):
    out = tmp_path / "run.zarr"
    first = number(fields(capture(text_file, out).stdout)["tokens"])
    result = capture(text_file, out, "--append")
    assert result.exit_code == 0, result.output
    got = fields(result.stdout)
    assert number(got["tokens"]) == first  # what this call added, not the store's total
    assert f"now {2 * first} tokens in {2 * len(DOCS)} sequences" in got["store"]
    assert number(fields(invoke("info", out).stdout)["tokens"]) == 2 * first
    assert invoke("verify", out).exit_code == 0

    assert capture(text_file, out, "--overwrite").exit_code == 0
    assert number(fields(invoke("info", out).stdout)["tokens"]) == first


def test_overwrite_never_deletes_what_is_not_a_store(text_file, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for args in (("capture", "--model", "tiny:llama", "--text", text_file, "--out", precious, "--overwrite"),
                 ("demo", "--model", "tiny:llama", "--out", precious)):
        result = invoke(*args)
        assert result.exit_code == 2 and "is not a streamtap store" in error_line(result)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_append_of_another_model_is_refused_in_one_line(text_file, tmp_path):
    out = tmp_path / "run.zarr"
    assert capture(text_file, out, arch="llama").exit_code == 0
    result = capture(text_file, out, "--append", arch="gpt2")
    assert result.exit_code == 2 and error_line(result).startswith("error: cannot append")
    assert "pass --overwrite to replace it" in result.stderr and "overwrite=True" not in result.stderr
    assert "Traceback" not in result.output


def test_verify_on_a_damaged_store_exits_1(text_file, tmp_path):
    out = tmp_path / "run.zarr"
    assert capture(text_file, out).exit_code == 0
    zarr.open_group(out, mode="r+")["mlp_out"][0:2] = 0
    result = invoke("verify", out)
    assert result.exit_code == 1
    assert fields(result.stdout)["invariant"] == "FAIL"
    assert "error: 2 of" in result.stderr and "miss the invariant" in result.stderr
    # a looser tolerance is the caller's call
    assert invoke("verify", out, "--tol", 1e9).exit_code == 0
    # info still describes the damaged store, and says so
    result = invoke("info", out)
    assert result.exit_code == 0 and fields(result.stdout)["max error"].endswith("FAIL)")


def test_verify_fails_on_nan_damage(text_file, tmp_path):
    out = tmp_path / "run.zarr"
    assert capture(text_file, out).exit_code == 0
    zarr.open_group(out, mode="r+")["mlp_out"][0:2] = float("nan")
    result = invoke("verify", out)
    assert result.exit_code == 1 and fields(result.stdout)["invariant"] == "FAIL"


def test_missing_store_is_one_line_on_stderr(tmp_path):
    for command in ("verify", "info"):
        result = invoke(command, tmp_path / "nothing.zarr")
        assert result.exit_code == 2
        assert error_line(result).startswith("error: no streamtap store") and "Traceback" not in result.output


def test_demo_on_a_tiny_model(tmp_path):
    out = tmp_path / "demo.zarr"
    for _ in range(2):  # the demo overwrites its own store by default
        result = invoke("demo", "--model", "tiny:llama", "--out", out)
        assert result.exit_code == 0, result.output
    got = fields(result.stdout)
    assert "tokens/s" in got["time"] and "ok" in got["max decomposition error"]
    assert re.search(r"top 10 heads\s+top 5 MLP terms", result.stdout)
    result = invoke("demo", "--model", "tiny:llama", "--out", out, "--no-overwrite")
    assert result.exit_code == 2 and "--overwrite" in result.stderr


# -- capture's options for long runs: --resume, --no-check, --store-dtype, --writer, --break-lock
def test_resume_continues_an_interrupted_capture_without_duplicates(text_file, tmp_path):
    out, whole = tmp_path / "run.zarr", tmp_path / "whole.zarr"
    assert capture(text_file, whole).exit_code == 0
    result = capture(text_file, out, "--resume")  # nothing there yet: a typo in --out must not start a capture
    assert result.exit_code == 2 and "nothing to resume at" in result.stderr and not out.exists()
    result = capture(text_file, out)
    assert result.exit_code == 0, result.output
    # as a crash between a batch's chunks and its commit leaves it: the last batch is not committed
    group = zarr.open_group(out, mode="r+")
    first_batch = DOCS[:3]
    group.attrs.update(committed_tokens=sum(len(d.split()) for d in first_batch), committed_sequences=3)
    result = capture(text_file, out, "--resume")
    assert result.exit_code == 0, result.output
    got = fields(result.stdout)
    assert number(got["sequences"]) == 1 and number(got["tokens"]) == len(DOCS[3].split())
    ours, theirs = zarr.open_group(out, mode="r"), zarr.open_group(whole, mode="r")
    for name in ("seq", "pos", "token_id", "z", "resid_final"):
        assert (ours[name][:] == theirs[name][:]).all(), name
    result = capture(text_file, out, "--resume")  # finished: adds nothing
    assert result.exit_code == 0 and number(fields(result.stdout)["sequences"]) == 0
    result = capture(text_file, out, "--resume", "--append")
    assert result.exit_code == 2 and "exclude each other" in result.stderr


def test_no_check_skips_the_attach_time_self_check(text_file, tmp_path, monkeypatch):
    import streamtap as st
    import streamtap.tapping.self_check

    def broken(the_tap, n_tokens=8):
        raise st.DecompositionError("layout does not fit (simulated)")

    monkeypatch.setattr(streamtap.tapping.self_check, "self_check", broken)
    result = capture(text_file, tmp_path / "a.zarr")
    assert result.exit_code == 2 and "layout does not fit (simulated)" in result.stderr
    result = capture(text_file, tmp_path / "b.zarr", "--no-check")
    assert result.exit_code == 0, result.output


def test_a_lossy_store_dtype_shows_in_info(text_file, tmp_path):
    out = tmp_path / "m.zarr"
    assert capture(text_file, out, "--store-dtype", "float16").exit_code == 0
    group = zarr.open_group(out, mode="r")
    assert group["z"].dtype == "float16" and group["resid_final"].dtype == "float32"
    result = invoke("info", out)
    assert result.exit_code == 0, result.output
    got = fields(result.stdout)
    rel, abs_, n = (group.attrs[k] for k in ("lossy_max_rel_error", "lossy_max_abs_error", "lossy_error_tokens"))
    assert 0 < rel < 1e-2 and n == sum(len(d.split()) for d in DOCS)
    assert got["stored as"] == (f"float16 (lossy): measured decomposition error {rel:.3g} relative, "
                                f"{abs_:.3g} absolute over {n:,} tokens")
    plain = tmp_path / "p.zarr"
    assert capture(text_file, plain).exit_code == 0
    got = fields(invoke("info", plain).stdout)
    assert got["stored as"] == "float32, the model's own (exact)"
    result = capture(text_file, tmp_path / "x.zarr", "--store-dtype", "float8")
    assert result.exit_code == 2 and "float8" in result.output


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_writer_picks_the_pipeline(mode, text_file, tmp_path, monkeypatch):
    from streamtap.io.pipeline import Pipeline  # ThreadPipeline is one too

    made = []
    real = Pipeline.__init__

    def spy(self, *args, **kwargs):
        made.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "__init__", spy)
    result = capture(text_file, tmp_path / "w.zarr", "--writer", mode)
    assert result.exit_code == 0, result.output
    assert [p.mode for p in made] == [mode]
    assert invoke("verify", tmp_path / "w.zarr").exit_code == 0


@pytest.mark.parametrize("flag, compressed", [((), False), (("--compress",), True), (("--no-compress",), False)])
def test_compress_chooses_the_codec_of_the_per_token_arrays(text_file, tmp_path, flag, compressed):
    out = tmp_path / "c.zarr"
    result = capture(text_file, out, *flag)  # a float32 model: raw unless asked
    assert result.exit_code == 0, result.output
    group = zarr.open_group(out, mode="r")
    assert bool(group["z"].compressors) is compressed
    assert invoke("verify", out).exit_code == 0


def test_break_lock_takes_over_a_lock_from_another_host(text_file, tmp_path):
    out = tmp_path / "run.zarr"
    assert capture(text_file, out).exit_code == 0
    zarr.open_group(out, mode="r+").attrs.update(committed_tokens=0, committed_sequences=0)
    plant_lock(out, {"host": "gpu-node-3", "pid": 77, "started": 0, "token": "a" * 32})
    result = capture(text_file, out, "--resume")
    assert result.exit_code == 2 and "pid 77 on host 'gpu-node-3'" in result.stderr
    assert "if that writer is gone, pass --break-lock to take the lock over" in result.stderr
    assert "break_lock=True" not in result.stderr  # the command line names the flag, not the keyword
    result = capture(text_file, out, "--resume", "--break-lock")
    assert result.exit_code == 0, result.output
    assert number(fields(result.stdout)["sequences"]) == len(DOCS) and not lock_exists(out)
