"""Nothing from a store is unpickled or executed, and models never run repository code unasked."""

import json
import pickle
import sys

import numpy as np
import pytest
import zarr

import streamtap as st
from streamtap.models import tiny_model

CORPUS = [[1, 2, 3, 4], [5, 6, 7]]
MARK = "pwned"  # the name of the file a loaded payload would create; eval of any text holding it fails


class _Payload:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


_WATCH: list = []  # events seen while a test watches; the audit hook cannot be removed, so it checks this
DANGEROUS = {"open", "system", "popen", "Popen", "eval", "exec", "__import__", "getattr"}


def _audit(event, args):
    if not _WATCH:
        return
    # an unpickler resolving a function a payload needs (dask round-trips its own objects through pickle,
    # which is why pickle itself cannot simply be switched off)
    if event == "pickle.find_class" and args[1] in DANGEROUS:
        _WATCH[0].append(f"unpickled {args[0]}.{args[1]}")
    elif event in ("compile", "exec") and args and MARK in repr(args[0]):
        _WATCH[0].append(f"{event} of text from the store")


sys.addaudithook(_audit)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Records any unpickling of a payload (Python's audit events, and pickle's load functions given bytes
    from a store) and any compile/exec of text from a store; numcodecs' pickle codec fails loudly."""
    calls = []

    def watched(name, real):
        def load(data, *args, **kwargs):
            raw = data if isinstance(data, (bytes, bytearray, memoryview)) else b""
            if MARK.encode() in bytes(raw):
                calls.append(f"pickle.{name} of store bytes")
                raise AssertionError(f"pickle.{name} was given bytes from a store")
            return real(data, *args, **kwargs)
        return load

    for name in ("loads", "_loads"):
        monkeypatch.setattr(pickle, name, watched(name, getattr(pickle, name)))
    import numcodecs.pickles

    def refused(*args, **kwargs):
        calls.append("numcodecs Pickle.decode")
        raise AssertionError("numcodecs' pickle codec was used while reading a store")

    monkeypatch.setattr(numcodecs.pickles.Pickle, "decode", refused)
    _WATCH.append(calls)
    yield calls
    _WATCH.clear()


def test_the_watch_sees_an_unpickling():
    calls = []
    _WATCH.append(calls)
    try:
        pickle.loads(pickle.dumps(_Payload("/nonexistent/dir/pwned")))
    except OSError:
        pass
    finally:
        _WATCH.clear()
    assert calls == ["unpickled io.open"]


def _store(tmp_path):
    path = tmp_path / "s.zarr"
    st.capture(tiny_model("llama"), CORPUS, path)
    st.verify(st.open(path))  # everything imported before the traps are set
    return path


def test_pickle_looking_attributes_are_read_as_inert_text(tmp_path, no_unpickling):
    path = _store(tmp_path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(str(marker)), protocol=0).decode("latin-1")
    group = zarr.open_group(path, mode="r+")
    group.attrs.update(model_name=payload, pickled_note={"__reduce__": payload, "py/object": "os.system"},
                       stream=f"__import__('os').system('touch {marker}') or " + group.attrs["stream"])
    ds = st.open(path)
    assert ds.attrs["model_name"] == payload  # a string, as written
    assert ds.attrs["pickled_note"]["py/object"] == "os.system"
    with pytest.raises(ValueError):  # the stream recipe is JSON: code in it is a parse error, not a command
        st.verify(ds)
    assert not marker.exists() and no_unpickling == []


def test_a_zarr_v2_store_with_a_pickled_object_array_is_refused(tmp_path, no_unpickling):
    """Zarr v2 object arrays carry their codec in metadata, and numcodecs' is pickle: st.open reads v3 only."""
    path = tmp_path / "v2.zarr"
    marker = tmp_path / "pwned"
    (path / "x").mkdir(parents=True)
    (path / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (path / ".zattrs").write_text(json.dumps({"committed_tokens": 1, "committed_sequences": 1, "schema_version": 1}))
    (path / "x" / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [1], "chunks": [1], "dtype": "|O", "compressor": None, "fill_value": None,
        "filters": [{"id": "pickle", "protocol": 4}], "order": "C", "dimension_separator": "."}))
    (path / "x" / "0").write_bytes(pickle.dumps(np.array([_Payload(str(marker))], dtype=object)))
    with pytest.raises(st.StreamtapError, match="no streamtap store"):
        st.open(path)
    assert not marker.exists() and no_unpickling == []


@pytest.mark.parametrize("trap", [
    {"codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "numcodecs.pickle"}]},
    {"data_type": "object"},
])
def test_a_member_asking_for_a_pickle_codec_or_object_dtype_is_refused(trap, tmp_path, no_unpickling):
    path = _store(tmp_path)
    marker = tmp_path / "pwned"
    meta = json.loads((path / "seq" / "zarr.json").read_text())
    meta.update(trap)
    (path / "evil" / "c").mkdir(parents=True)
    (path / "evil" / "zarr.json").write_text(json.dumps(meta))
    (path / "evil" / "c" / "0").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(st.StreamtapError, match="cannot be read: .*never unpickles"):
        st.open(path)
    assert not marker.exists() and no_unpickling == []


# -- models ----------------------------------------------------------------------------------------
@pytest.fixture
def fake_hub(monkeypatch):
    """from_pretrained replaced: records its kwargs and returns a tiny model and a word-level tokenizer."""
    import transformers

    from streamtap.models.tokenizer import word_level_tokenizer

    calls = []

    def model(source, **kwargs):
        calls.append(("model", source, kwargs))
        return tiny_model("llama")

    def tokenizer(source, **kwargs):
        calls.append(("tokenizer", source, kwargs))
        return word_level_tokenizer(["a b c d e"], 128)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    return calls


@pytest.mark.parametrize("asked", [False, True])
def test_load_model_passes_trust_remote_code_only_as_asked(asked, fake_hub):
    from streamtap.models import load_model

    load_model("some-org/some-model", trust_remote_code=asked)
    assert [(kind, kwargs["trust_remote_code"]) for kind, _, kwargs in fake_hub] == [("model", asked), ("tokenizer", asked)]


@pytest.mark.parametrize("flag", [[], ["--trust-remote-code"]])
def test_the_command_line_model_loading_trusts_remote_code_only_with_the_flag(flag, fake_hub, tmp_path):
    from click.testing import CliRunner

    from streamtap.cli import cli

    text = tmp_path / "t.txt"
    text.write_text("a b c\nd e\n")
    result = CliRunner().invoke(cli, ["capture", "--model", str(tmp_path / "model-dir"), "--text", str(text),
                                      "--out", str(tmp_path / "s.zarr"), *flag])
    assert result.exit_code == 0, result.output
    assert {kind for kind, _, _ in fake_hub} == {"model", "tokenizer"}
    assert all(kwargs["trust_remote_code"] is bool(flag) for _, _, kwargs in fake_hub)
