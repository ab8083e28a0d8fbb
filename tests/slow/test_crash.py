"""Never lose a token: a capture SIGKILLed at random moments leaves a store that opens, verifies,
and resumes with no duplicated and no missing sequences."""

import random

import numpy as np

import streamtap as st
from streamtap.models import tiny_model

from _crash import CORPUS, committed, kill_during_capture


def test_killed_captures_open_verify_and_resume_exactly(tmp_path):
    path = str(tmp_path / "run.zarr")
    rng = random.Random(1234)
    for _ in range(3):
        kill_during_capture(path, rng)
        ds = st.open(path)                       # opens after every kill
        assert ds.sizes["token"] == sum(len(t) for t in CORPUS[:committed(path)])
        st.verify(ds)                            # and every committed token adds up
    st.capture(tiny_model("llama"), CORPUS, path, batch_size=2, resume=True)
    resumed = st.open(path)
    st.capture(tiny_model("llama"), CORPUS, tmp_path / "once.zarr", batch_size=2)
    once = st.open(tmp_path / "once.zarr")
    np.testing.assert_array_equal(resumed.seq.values, once.seq.values)   # none duplicated, none missing
    np.testing.assert_array_equal(resumed.token_id.values, once.token_id.values)
    assert np.abs(resumed.z.values - once.z.values).max() <= 1e-5 * np.abs(once.z.values).max()


def test_resume_of_a_finished_capture_adds_nothing(tmp_path):
    model = tiny_model("llama")
    st.capture(model, CORPUS[:5], tmp_path / "s.zarr")
    tap = st.capture(model, CORPUS[:5], tmp_path / "s.zarr", resume=True)
    assert tap.tokens == 0 and st.open(tmp_path / "s.zarr").attrs["committed_sequences"] == 5


def test_verify_reports_a_damaged_chunk_with_the_tokens_it_affects(tmp_path):
    import glob
    import os

    path = tmp_path / "s.zarr"
    st.capture(tiny_model("llama"), CORPUS[:20], path, batch_size=4)
    chunk = sorted(glob.glob(os.path.join(path, "mlp_out", "c", "*", "*", "*")))[0]
    with open(chunk, "wb") as f:
        f.write(b"\x00garbage, not a blosc frame")
    with __import__("pytest").raises(st.DecompositionError, match=r"damaged data .* tokens 0\.\.\d+ \(seq 0 pos 0 to seq"):
        st.verify(st.open(path))


def test_an_empty_committed_store_verifies(tmp_path):
    import zarr

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
