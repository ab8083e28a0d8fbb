"""Peer check: streamtap's per-head messages equal TransformerLens 4.x's per-head results."""

import numpy as np
import pytest

import streamtap as st
from streamtap.models import TINY_ARCHS, tiny_model

from _peers import tl_available, tl_head_results
from _util import padded_batch, run

pytestmark = pytest.mark.skipif(not tl_available(), reason="transformer-lens is a test dependency")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_messages_equal_transformerlens_head_results(arch, tmp_path):
    model = tiny_model(arch)
    ids, mask = padded_batch(model.config.vocab_size, [10, 6], seed=11)
    with st.tap(model, tmp_path / "s.zarr"):
        run(model, ids, mask)
    ds = st.open(tmp_path / "s.zarr")
    theirs = tl_head_results(model, ids, mask)[mask.bool().numpy()]  # (token, layer, head, d_model)
    ours = ds.messages.values
    assert ours.shape == theirs.shape
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 1e-5 * scale
