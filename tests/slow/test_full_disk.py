"""A full disk ends a capture with a clear StoreFullError on the model's thread; the store stays valid at
its last committed batch, and resume=True after freeing space completes it exactly.

The disk is simulated by a zarr store wrapper that raises ENOSPC once N bytes went through it, which
runs everywhere; where the tests run as root, a real tmpfs of 1 MiB is mounted as well.
"""

import errno
import os
import shutil
import subprocess

import numpy as np
import pytest
from zarr.storage import LocalStore, WrapperStore

import streamtap as st
from streamtap.io.lock import LOCK_NAME
from streamtap.models import tiny_model

from _crash import CORPUS

BATCH = 4


class FullDisk(WrapperStore):
    """A store that runs out of space once ``limit`` bytes were written through it (``limit=None``: never)."""

    def __init__(self, store, limit=None, written=None):
        super().__init__(store)
        self.limit = limit
        self.written = [0] if written is None else written  # shared with the read-only views zarr makes

    def _with_store(self, store):
        view = type(self)(store, self.limit, self.written)
        view.__dict__["_owner"] = self  # the limit is read from the store the test holds
        return view

    def _limit(self):
        owner = self.__dict__.get("_owner", self)
        return owner.limit

    async def set(self, key, value):
        limit = self._limit()
        if limit is not None and self.written[0] + len(value) > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
        self.written[0] += len(value)
        await self._store.set(key, value)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted capture of the corpus, and how many bytes it writes."""
    root = tmp_path_factory.mktemp("full")
    probe = FullDisk(LocalStore(str(root / "probe.zarr")))
    st.capture(tiny_model("llama"), CORPUS, probe, batch_size=BATCH)
    return st.open(str(root / "probe.zarr")), probe.written[0]


def _same(ds, ref):
    np.testing.assert_array_equal(ds.seq.values, ref.seq.values)  # none duplicated, none missing
    np.testing.assert_array_equal(ds.token_id.values, ref.token_id.values)
    np.testing.assert_array_equal(ds.pos.values, ref.pos.values)
    assert np.abs(ds.z.values - ref.z.values).max() <= 1e-5 * np.abs(ref.z.values).max()


@pytest.mark.parametrize("mode", ["inline", "thread"])
def test_a_full_disk_stops_the_capture_clearly_and_resume_completes_it(mode, reference, tmp_path):
    ref, total = reference
    path = str(tmp_path / "s.zarr")
    disk = FullDisk(LocalStore(path), limit=total // 2)
    with pytest.raises(st.StoreFullError) as info:  # raised here, on the model's thread, in both modes
        st.capture(tiny_model("llama"), CORPUS, disk, batch_size=BATCH, writer=mode)
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    message = str(err)
    assert "is full" in message and "No space left on device" in message
    assert f"{err.tokens:,} tokens in {err.sequences:,} sequences" in message
    assert "resume=True" in message and "--resume" in message
    assert 0 < err.sequences < len(CORPUS) and err.sequences % BATCH == 0
    if mode == "thread":
        assert any("background writer" in note for note in err.__notes__)
    assert LOCK_NAME not in os.listdir(path)  # released even though the disk is full

    ds = st.open(path)  # valid at its last committed batch
    assert ds.attrs["committed_sequences"] == err.sequences
    assert ds.sizes["token"] == err.tokens == sum(len(t) for t in CORPUS[:err.sequences])
    st.verify(ds)
    _same(ds, ref.isel(token=slice(0, err.tokens)))

    disk.limit = None  # space freed
    tap = st.capture(tiny_model("llama"), CORPUS, disk, batch_size=BATCH, writer=mode, resume=True)
    assert tap.sequences == len(CORPUS) - err.sequences
    ds = st.open(path)
    _same(ds, ref)
    st.verify(ds)


def test_a_disk_full_before_the_first_commit_leaves_a_store_that_resume_recreates(reference, tmp_path):
    ref, _ = reference
    path = str(tmp_path / "s.zarr")
    disk = FullDisk(LocalStore(path), limit=2000)  # not even the static weights fit
    with pytest.raises(st.StoreFullError, match=r"while creating the store.* 0 tokens in 0 sequences"):
        st.capture(tiny_model("llama"), CORPUS, disk, batch_size=BATCH)
    with pytest.raises(st.StreamtapError, match="not a streamtap store"):
        st.open(path)
    disk.limit = None
    st.capture(tiny_model("llama"), CORPUS, disk, batch_size=BATCH, resume=True)
    _same(st.open(path), ref)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real filesystem of 1 MiB (root only); yields (mount point, remount(size_kib))."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the store-wrapper tests above cover a full disk everywhere")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1024k", "tmpfs", str(mnt)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")

    def remount(kib):
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(mnt)], check=True)

    try:
        yield mnt, remount
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_full_filesystem(small_tmpfs, reference):
    mnt, remount = small_tmpfs
    ref, _ = reference
    path = str(mnt / "s.zarr")
    # Uncompressed chunks of 4,096 tokens take their full size from the first batch on: 6.2 MiB
    # for the first chunk of every variable (with the weights), 12.2 MiB once the 6,624 tokens
    # spill into a second. 9 MiB holds the first (and a chunk's rewrite beside it), not the second.
    corpus = CORPUS * 16
    remount(9 << 10)
    with pytest.raises(st.StoreFullError, match="planned store needs"):   # the plan refuses it up front
        st.capture(tiny_model("llama"), corpus, path, batch_size=BATCH, compress=False)
    assert not (mnt / "s.zarr").exists()
    with pytest.raises(st.StoreFullError) as info:   # started anyway: the disk fills mid-capture
        st.capture(tiny_model("llama"), corpus, path, batch_size=BATCH, compress=False, ignore_free_space=True)
    err = info.value
    assert 0 < err.sequences < len(corpus)
    ds = st.open(path)
    assert ds.attrs["committed_sequences"] == err.sequences
    st.verify(ds)
    remount(64 << 10)
    st.capture(tiny_model("llama"), corpus, path, batch_size=BATCH, resume=True)
    ds = st.open(path)
    np.testing.assert_array_equal(ds.seq.values, np.repeat(np.arange(len(corpus)), [len(t) for t in corpus]))
    np.testing.assert_array_equal(ds.token_id.values, np.concatenate([np.array(t) for t in corpus]))
    st.verify(ds)
