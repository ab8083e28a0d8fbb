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
