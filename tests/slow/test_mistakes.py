"""Every mistake a user can make gets one line naming the problem and the fix, exit code 2, nothing written;
and `verify` means the store is whole. Through the real command line, in a subprocess, on real files."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

import streamtap as st
from streamtap.models import tiny_model

from _util import plant_lock

DOCS = ["the cat sat on the mat", "a dog ran far away", "heads write to the stream", "the end"]


def cli(*args, cwd=None, env=None, timeout=300):
    """``streamtap ARGS`` in a child process: (exit code, stdout, stderr, seconds)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "streamtap.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - start


def one_error_line(stderr: str) -> str:
    """The command's error: exactly one line starting with ``error:``, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store made the way the command line makes it (word-level tokenizer: token text stored)."""
    root = tmp_path_factory.mktemp("made")
    (root / "docs.txt").write_text("\n".join(DOCS * 30) + "\n", encoding="utf-8")
    code, out, err, _ = cli("capture", "--model", "tiny:llama", "--text", root / "docs.txt", "--out",
                            root / "run.zarr", "--neurons", "--batch-size", "4")
    assert code == 0, err
    return root / "run.zarr"


def damaged_copy(store, tmp_path, name="bad.zarr"):
    target = tmp_path / name
    shutil.copytree(store, target)
    return target


def chunk_files(path, array):
    return sorted(f for f in glob.glob(os.path.join(path, array, "c", "**", "*"), recursive=True) if os.path.isfile(f))


# -- wrong input to capture ------------------------------------------------------------------------
def test_a_latin1_or_binary_text_file_is_named_by_line_and_byte(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\ncaf\xe9 au lait\n".encode("latin-1"))
    code, _, err, _ = cli("capture", "--model", "tiny:llama", "--text", latin, "--out", tmp_path / "a.zarr")
    line = one_error_line(err)
    assert code == 2 and "is not UTF-8 text: line 2, byte 14 (0xe9)" in line and "one document per line" in line
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"ok\n\x00\x01\x02\n")
    code, _, err, _ = cli("capture", "--model", "tiny:llama", "--text", binary, "--out", tmp_path / "b.zarr")
    assert code == 2 and "NUL byte on line 2" in one_error_line(err)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_a_directory_that_is_no_model_is_named(text, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err, _ = cli("capture", "--model", empty, "--text", text, "--out", tmp_path / "a.zarr")
    assert code == 2 and "is a directory but not a model directory: it has no config.json" in one_error_line(err)
    typeless = tmp_path / "typeless"
    typeless.mkdir()
    (typeless / "config.json").write_text(json.dumps({"hidden_size": 8}))
    code, _, err, _ = cli("capture", "--model", typeless, "--text", text, "--out", tmp_path / "b.zarr")
    assert code == 2 and "config.json has no model_type" in one_error_line(err)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_an_unreachable_hub_fails_at_once(text, tmp_path):
    code, _, err, seconds = cli("capture", "--model", "some-org/no-such-model", "--text", text, "--out",
                                tmp_path / "a.zarr", env={"HF_HUB_OFFLINE": "1"})
    line = one_error_line(err)
    assert code == 2 and "the Hugging Face hub cannot be reached, and it is not in the local cache" in line
    assert seconds < 30  # was ~60 s of retries before the message


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write to: a read-only mount for root (permissions do not stop
    root), a directory without write permission otherwise."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"root here cannot mount a read-only file system ({mounted.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_an_unwritable_target_is_refused_before_the_model_loads(text, tmp_path, read_only_dir):
    # --model names a directory that would fail to load: the error about --out proves it came first
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    code, _, err, _ = cli("capture", "--model", no_model, "--text", text, "--out", read_only_dir / "run.zarr")
    line = one_error_line(err)
    assert code == 2 and f"cannot write to {read_only_dir / 'run.zarr'}" in line and "--out" in line


def test_a_second_writer_learns_of_the_lock_before_the_model_loads(text, tmp_path):
    out = tmp_path / "run.zarr"
    assert cli("capture", "--model", "tiny:llama", "--text", text, "--out", out)[0] == 0
    plant_lock(out, {"host": os.uname().nodename, "pid": os.getpid(), "started": time.time(), "token": "b" * 32})
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    code, _, err, _ = cli("capture", "--model", no_model, "--text", text, "--out", out, "--append")
    line = one_error_line(err)
    assert code == 2 and f"pid {os.getpid()}" in line and "is being written by another streamtap writer" in line
    assert "then resume with --resume." in line and "resume=True" not in line


@pytest.mark.parametrize("kind", ["file", "directory"])
@pytest.mark.parametrize("mode", [[], ["--append"], ["--resume"], ["--overwrite"]], ids=["new", "append", "resume", "overwrite"])
def test_a_target_that_is_no_store_is_said_to_be_none(text, tmp_path, kind, mode):
    out = tmp_path / "thing"
    if kind == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    code, _, err, _ = cli("capture", "--model", "tiny:llama", "--text", text, "--out", out, *mode)
    assert code == 2 and "exists and is not a streamtap store" in one_error_line(err)
    assert (out.read_text() if kind == "file" else (out / "notes.txt").read_text()) == "mine"


def test_resume_of_nothing_is_refused_and_creates_nothing(text, tmp_path):
    code, _, err, _ = cli("capture", "--model", "tiny:llama", "--text", text, "--out", tmp_path / "typo.zarr",
                          "--resume")
    line = one_error_line(err)
    assert code == 2 and "nothing to resume at" in line
    assert "to start a new capture, leave out --resume" in line and "resume=True" not in line  # the flag, as typed
    assert not (tmp_path / "typo.zarr").exists()


def test_an_existing_store_asks_for_a_command_line_flag(text, tmp_path):
    out = tmp_path / "run.zarr"
    assert cli("capture", "--model", "tiny:llama", "--text", text, "--out", out)[0] == 0
    code, _, err, _ = cli("capture", "--model", "tiny:llama", "--text", text, "--out", out)
    line = one_error_line(err)
    assert code == 2 and "--overwrite" in line and "overwrite=True" not in line


def test_a_document_too_long_is_named_by_its_line_before_anything_is_written(tmp_path):
    path = tmp_path / "docs.txt"
    long = " ".join(["word"] * 80)  # the tiny models take 64 positions
    path.write_text("short one\n\nanother short\n" + "x y\n" * 20 + long + "\n", encoding="utf-8")
    out = tmp_path / "run.zarr"
    code, _, err, _ = cli("capture", "--model", "tiny:llama", "--text", path, "--out", out, "--batch-size", "2")
    line = one_error_line(err)
    assert code == 2 and f"line 24 of {path} has 80 tokens, more than the limit of 64" in line
    assert "; pass --truncate to cut it" in line and "truncate=True" not in line  # the flag, as typed
    assert not out.exists()  # checked before the first batch: nothing committed
    # from Python the same advice names the keyword first
    with pytest.raises(st.InputError, match=r"text 1 has 80 tokens, .*; pass truncate=True \(--truncate\) to cut it"):
        st.capture(tiny_model("llama"), [[5, 6], list(range(2, 82))], out)
    assert not out.exists()


def test_token_ids_outside_the_vocabulary_are_named(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(st.InputError, match=r"text 1 holds token id 500, outside the model's vocabulary of 128 ids"):
        st.capture(model, [[1, 2, 3], [4, 500, 6]], tmp_path / "a.zarr")
    assert not (tmp_path / "a.zarr").exists()
    with pytest.raises(st.InputError, match=r"batch row 0 holds token id 999, outside the model's vocabulary"):
        with st.tap(model, tmp_path / "b.zarr"), torch.no_grad():
            model(input_ids=torch.tensor([[5, 999]]))


# -- stores on S3 that cannot be reached ----------------------------------------------------------------
def test_s3_without_an_endpoint_is_one_line(tmp_path, text):
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_MAX_ATTEMPTS": "1",
           "AWS_RETRY_MODE": "standard"}
    url = "s3://bucket/run.zarr"
    opt = ["--storage-option", "endpoint_url=http://127.0.0.1:9"]  # nothing listens there
    for args in (["info", url, *opt], ["verify", url, *opt],
                 ["capture", "--model", "tiny:llama", "--text", text, "--out", url, *opt]):
        code, _, err, _ = cli(*args, env=env)
        line = one_error_line(err)
        assert code == 2 and "cannot reach s3://bucket/run.zarr" in line and "endpoint_url" in line, line


# -- damaged metadata and the report --------------------------------------------------------------------
def test_damaged_metadata_is_one_line(store, tmp_path):
    missing = damaged_copy(store, tmp_path, "missing.zarr")
    os.remove(missing / "zarr.json")
    garbled = damaged_copy(store, tmp_path, "garbled.zarr")
    (garbled / "zarr.json").write_text("{not json")
    for path, expected in ((missing, "no streamtap store at"), (garbled, "the metadata of")):
        for command in ("info", "verify"):
            code, _, err, _ = cli(command, path)
            assert code == 2 and expected in one_error_line(err), err


def test_report_refuses_a_token_out_of_range_and_a_failed_report_leaves_nothing(store, tmp_path, monkeypatch):
    code, _, err, _ = cli("report", store, "--out", tmp_path / "r", "--token", 99999)
    assert code == 2 and "token 99999 is out of range: the store holds" in one_error_line(err)
    assert not (tmp_path / "r").exists()
    import streamtap.report.page as page

    def broken(*args, **kwargs):
        raise RuntimeError("a section failed")

    monkeypatch.setattr(page, "_ranks", broken)
    with pytest.raises(RuntimeError, match="a section failed"):
        page.write_report(store, tmp_path / "r2")
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".r2", "r2"))]


def test_report_uses_the_stores_tokenizer_offline_and_else_the_stored_text(store, tmp_path):
    # a model directory with its tokenizer saved beside it: the report finds it by the store's model name
    from streamtap.models.tokenizer import word_level_tokenizer

    docs = DOCS * 30
    model_dir = tmp_path / "llama_dir"
    tiny_model("llama").save_pretrained(model_dir)
    word_level_tokenizer(docs, 128).save_pretrained(model_dir)
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    code, _, err, _ = cli("capture", "--model", model_dir, "--text", tmp_path / "docs.txt", "--out",
                          tmp_path / "ld.zarr", "--batch-size", "4")
    assert code == 0, err
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    as_id = re.compile(r"(?:&lt;|<)\d+(?:&gt;|>)")  # a token the report could only name by its id: "<105>"
    code, _, err, _ = cli("report", tmp_path / "ld.zarr", "--out", tmp_path / "with", env=offline)
    assert code == 0, err
    page = (tmp_path / "with" / "index.html").read_text()
    assert not as_id.findall(page)  # the random model predicts ids the corpus never holds: the tokenizer names them
    # a tiny:llama store has no tokenizer on disk: the words come from the stored token text, other ids stay ids
    code, _, err, _ = cli("report", store, "--out", tmp_path / "without", env=offline)
    assert code == 0, err
    page = (tmp_path / "without" / "index.html").read_text()
    quoted = [w for w in ("cat", "dog", "mat") if re.search(rf"&(?:quot|#x27);{w}&(?:quot|#x27);", page)]
    assert as_id.findall(page) and quoted == ["cat", "dog", "mat"]


# -- verify means the store is whole ------------------------------------------------------------------
def _first_chunk(path, array, how):
    victim = chunk_files(path, array)[0]
    if how == "delete":
        os.remove(victim)
    else:
        with open(victim, "r+b") as f:
            f.truncate(16)


def _write_non_finite(path, array):
    weight = zarr.open_group(path, mode="r+")[array]
    weight[(0,) * weight.ndim] = np.nan
    weight[(1,) * weight.ndim] = np.inf


def _relabel_sequence_1(path):
    seq = zarr.open_group(path, mode="r+")["seq"]
    values = seq[:]
    seq[:] = np.where(values == 1, 0, values)  # seq 1's tokens now read as seq 0's: one sequence short


DAMAGE = {
    "delete": lambda path, array: _first_chunk(path, array, "delete"),
    "truncate": lambda path, array: _first_chunk(path, array, "truncate"),
    "remove its directory": lambda path, array: shutil.rmtree(path / array),
    "remove its zarr.json": lambda path, array: os.remove(path / array / "zarr.json"),
    "write nan and inf": _write_non_finite,
    "relabel sequence 1": lambda path, array: _relabel_sequence_1(path),
}
MISSING = "neuron_act: missing: the store lists it but it cannot be opened (its metadata or directory is gone)"


@pytest.mark.parametrize("array, damage, said", [
    ("token_id", "delete", "token_id: no value (the fill value"),
    ("seq", "truncate", "seq: cannot be read"),
    ("z", "truncate", "z: cannot be read"),
    ("W_U", "delete", "W_U: "),
    ("neuron_act", "truncate", "neuron_act: cannot be read"),
    ("neuron_act", "remove its directory", MISSING),
    ("neuron_act", "remove its zarr.json", MISSING),
    ("W_U", "write nan and inf", "W_U: 2 non-finite values in a static weight"),
    ("W_O", "write nan and inf", "W_O: 2 non-finite values in a static weight"),
    ("seq", "relabel sequence 1", "seq: 119 sequences have tokens, 120 are committed"),
])
def test_verify_names_each_damaged_array_and_info_describes_it(store, tmp_path, array, damage, said):
    bad = damaged_copy(store, tmp_path)
    DAMAGE[damage](bad, array)
    code, out, err, _ = cli("verify", bad)
    assert code == 1 and "Traceback" not in err and f"damaged: {said}" in out, (out, err)
    assert "error: the store is damaged (1 problem, listed above)" in err, err
    code, out, err, _ = cli("info", bad)
    assert code == 0 and "integrity    DAMAGED, 1 problem:" in out and f"damaged: {said}" in out, (out, err)
    with pytest.raises(st.StoreDamagedError, match=re.escape(said)):
        st.verify(bad)


def test_the_undamaged_store_verifies(store):
    code, out, err, _ = cli("verify", store)
    assert code == 0 and re.search(r"^store +whole$", out, re.M) and "damaged" not in out + err, (out, err)
    code, out, _, _ = cli("info", store)
    assert code == 0 and re.search(r"^integrity +whole$", out, re.M), out


def test_a_writer_that_died_after_its_last_commit_is_tidied_by_resume(store, tmp_path):
    out = damaged_copy(store, tmp_path, "dead.zarr")
    group = zarr.open_group(out, mode="r+")
    committed = int(group.attrs["committed_tokens"])
    for _, arr in group.arrays():  # the capacity a writer grows ahead of its commits, never trimmed
        if (arr.metadata.dimension_names or ())[:1] == ("token",):
            arr.resize((committed + 100, *arr.shape[1:]))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    plant_lock(out, {"host": os.uname().nodename, "pid": int(dead.stdout), "started": 0, "token": "d" * 32})
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(DOCS * 30) + "\n", encoding="utf-8")
    code, _, err, _ = cli("capture", "--model", "tiny:llama", "--text", text, "--out", out, "--resume", "--neurons",
                          "--batch-size", "4")
    assert code == 0, err
    import xarray as xr

    plain = xr.open_zarr(out, consolidated=False, zarr_format=3)
    assert plain.sizes["token"] == committed and not os.path.exists(out / "streamtap.lock")


def test_a_capture_interrupted_by_ctrl_c_exits_130(tmp_path):
    import signal

    path = tmp_path / "long.txt"
    path.write_text("\n".join(" ".join(["tok"] * (5 + i % 20)) for i in range(2000)), encoding="utf-8")
    child = subprocess.Popen([sys.executable, "-m", "streamtap.cli", "capture", "--model", "tiny:llama", "--text",
                              str(path), "--out", str(tmp_path / "run.zarr"), "--batch-size", "2"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (tmp_path / "run.zarr" / "zarr.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err


# -- analyses on a store made the way the command line makes it -----------------------------------------
def test_neuron_memories_reads_the_stored_token_text(store):
    ds = st.open(store)
    assert ds["text"].dtype.kind in "OTU"  # numpy's StringDType reads back as kind "T"
    got = st.analysis.neuron_memories(ds, ["L0N3", (1, 5)], k=3)
    assert got.top_text.dtype.kind == "U" and got.top_context.dtype.kind == "U"
    assert set(got.top_text.values.ravel()) <= set(np.asarray(ds.text.values).astype(object))


def test_info_says_which_arrays_are_compressed(store, text, tmp_path):
    _, out, _, _ = cli("info", store)
    assert "compression  per-token arrays raw; static weights Blosc zstd-1," in out
    assert cli("capture", "--model", "tiny:llama", "--text", text, "--out", tmp_path / "z.zarr", "--compress")[0] == 0
    _, out, _, _ = cli("info", tmp_path / "z.zarr")
    assert "compression  per-token arrays Blosc zstd-1," in out
    # the ratio is the committed tokens' bytes over the bytes of their chunk files, counted here from the
    # files themselves; not over whole 4096-row chunks, whose unused rows made 18 tokens read 249.72x
    group = zarr.open_group(tmp_path / "z.zarr", mode="r")
    raw, disk = {"per-token": 0, "static": 0}, {"per-token": 0, "static": 0}
    for name, arr in group.arrays():
        per_token = (arr.metadata.dimension_names or ())[:1] == ("token",)
        if name in ("seq", "pos", "token_id", "text") or not arr.compressors:
            continue
        kind = "per-token" if per_token else "static"
        raw[kind] += arr[:].nbytes  # the store holds exactly the committed rows
        disk[kind] += sum(os.path.getsize(f) for f in chunk_files(tmp_path / "z.zarr", name))
    assert group["z"].shape[0] == int(group.attrs["committed_tokens"]) < group["z"].chunks[0]
    ratio = {kind: raw[kind] / disk[kind] for kind in raw}
    assert (f"compression  per-token arrays Blosc zstd-1, {ratio['per-token']:.2f}x; static weights Blosc zstd-1, "
            f"{ratio['static']:.2f}x") in out, (out, ratio)
    assert 1 < ratio["per-token"] < 3  # random float terms: Blosc saves a little, never 100x


def test_a_model_posing_as_another_family_is_refused_at_the_head():
    # a Cohere model whose config says llama decomposes block by block, but its logit scale and
    # centring final norm make the llama layout's attributions wrong: the self-check reads the head too
    from transformers import AutoModelForCausalLM, CohereConfig

    config = CohereConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          logit_scale=0.0625, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config.model_type = "llama"
    with pytest.raises(st.DecompositionError, match=r"layout 'llama' does not fit this CohereForCausalLM: the logits"):
        with st.tap(model, zarr.storage.MemoryStore()):
            pass
