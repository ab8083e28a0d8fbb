"""The store lock itself (streamtap.io.lock.StoreLock, StoreWriter.lock): exclusive, per rank store, and in a
memory store; no model."""

import os

import pytest
import zarr

import streamtap as st
from streamtap.io.lock import StoreLock
from streamtap.io.writer import StoreWriter


def test_each_rank_store_has_its_own_lock(tmp_path):
    from streamtap.io.ranks import rank_store

    a = StoreWriter(rank_store(str(tmp_path / "dp.zarr"), 0, 2))
    b = StoreWriter(rank_store(str(tmp_path / "dp.zarr"), 1, 2))
    a.lock()
    b.lock()  # another rank's store: no conflict
    with pytest.raises(st.StoreLockedError):
        StoreWriter(rank_store(str(tmp_path / "dp.zarr"), 1, 2)).lock()
    assert sorted(os.listdir(tmp_path / "dp.zarr")) == ["rank-00000.zarr", "rank-00001.zarr"]
    a.unlock()
    b.unlock()
    assert not os.path.exists(tmp_path / "dp.zarr" / "rank-00000.zarr")


def test_the_lock_is_exclusive_in_a_memory_store_too():
    store = zarr.storage.MemoryStore()
    first, second = StoreLock(store, "mem"), StoreLock(store, "mem")
    first.acquire()
    with pytest.raises(st.StoreLockedError):
        second.acquire()
    first.release()
    second.acquire()
    second.release()
    assert first.read() is None
