"""Data-parallel capture: two gloo ranks on CPU write one logical store."""

import os

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

import streamtap as st
from streamtap.models import tiny_model

CORPUS = [[(7 * i + j) % 120 + 1 for j in range(3 + i % 5)] for i in range(7)]


def _rank_main(rank: int, world: int, init: str, path: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        st.capture(tiny_model("llama"), CORPUS, path, batch_size=2)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    path = str(tmp_path / "dp.zarr")
    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / 'init'}", path), nprocs=2, join=True)
    assert sorted(os.listdir(path)) == ["rank-00000.zarr", "rank-00001.zarr"]
    combined = st.open(path)
    st.capture(tiny_model("llama"), CORPUS, tmp_path / "one.zarr", batch_size=2)
    single = st.open(tmp_path / "one.zarr")
    assert combined.attrs["ranks"] == 2
    assert combined.attrs["committed_sequences"] == single.attrs["committed_sequences"] == len(CORPUS)
    for name in ("seq", "pos", "token_id"):
        np.testing.assert_array_equal(combined[name].values, single[name].values)
    for name in ("embed", "z", "mlp_out", "resid_final", "head_output"):
        ours, theirs = combined[name].values, single[name].values
        assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max(), name
    st.verify(combined)
    terms = st.decompose(combined)
    assert terms.sizes["token"] == sum(len(t) for t in CORPUS)
