"""What a crash relies on, in this process: a resume adds only what was not committed, a damaged chunk is
reported with its tokens, an empty committed store verifies, and a commit is one write of the group's
metadata. (Captures SIGKILLed at random moments: tests/slow/test_crash.py.)"""

import glob
import os

import pytest
import zarr

import streamtap as st
from streamtap.models import tiny_model

from _crash import CORPUS


def test_resume_of_a_finished_capture_adds_nothing(tmp_path):
    model = tiny_model("llama")
    st.capture(model, CORPUS[:5], tmp_path / "s.zarr")
    tap = st.capture(model, CORPUS[:5], tmp_path / "s.zarr", resume=True)
    assert tap.tokens == 0 and st.open(tmp_path / "s.zarr").attrs["committed_sequences"] == 5


def test_verify_reports_a_damaged_chunk_with_the_tokens_it_affects(tmp_path):
    path = tmp_path / "s.zarr"
    st.capture(tiny_model("llama"), CORPUS[:20], path, batch_size=4)
    chunk = sorted(glob.glob(os.path.join(path, "mlp_out", "c", "*", "*", "*")))[0]
    with open(chunk, "wb") as f:
        f.write(b"\x00garbage, not a blosc frame")
    with pytest.raises(st.StoreDamagedError, match=r"mlp_out: cannot be read .* \(tokens 0\.\.\d+, seq 0 pos 0 to seq"):
        st.verify(st.open(path))


def test_an_empty_committed_store_verifies(tmp_path):
    path = tmp_path / "s.zarr"
    st.capture(tiny_model("llama"), CORPUS[:2], path)
    zarr.open_group(path, mode="r+").attrs.update(committed_tokens=0, committed_sequences=0)
    err = st.verify(st.open(path))
    assert err.sizes["token"] == 0


def test_a_commit_is_one_write_of_the_group_metadata(tmp_path):
    """The committed token and sequence counts change together: zarr's ``attrs.update`` writes zarr.json
    once per key, and a kill between two such writes left tokens counted without their sequences."""
    from zarr.storage import LocalStore, WrapperStore

    class Recording(WrapperStore):
        keys: list = []

        async def set(self, key, value):
            Recording.keys.append(key)
            await self._store.set(key, value)

    Recording.keys = []
    st.capture(tiny_model("llama"), CORPUS[:6], Recording(LocalStore(str(tmp_path / "s.zarr"))), batch_size=2)
    first_chunk = next(i for i, k in enumerate(Recording.keys) if k.startswith("seq/c/"))
    commits = [k for k in Recording.keys[first_chunk:] if k == "zarr.json"]
    assert len(commits) == 3  # one per batch of two sequences
