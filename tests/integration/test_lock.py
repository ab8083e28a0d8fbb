"""One writer per store: a second writer gets StoreLockedError, never interleaved data; a stale lock is
taken over on resume; one from another host needs break_lock. (Writers in other processes, a SIGKILLed
one included: tests/slow/test_lock_processes.py.)"""

import os
import socket
import time

import numpy as np
import pytest

import streamtap as st
from streamtap.io.lock import LOCK_NAME
from streamtap.models import tiny_model

from _crash import CORPUS, committed
from _util import lock_exists, lock_holder, padded_batch, plant_lock, run


def _lock(path):
    return lock_holder(path)


def test_a_second_tap_on_the_same_store_is_refused_and_the_first_is_untouched(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "s.zarr"
    ids, mask = padded_batch(model.config.vocab_size, [5, 3])
    with st.tap(model, path) as first:
        run(model, ids, mask)
        holder = _lock(path)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and len(holder["token"]) == 32
        for kwargs in ({"append": True}, {"overwrite": True}):
            with pytest.raises(st.StoreLockedError, match=rf"pid {os.getpid()} on host .*resume=True \(--resume\)"):
                with st.tap(model, path, **kwargs):
                    run(model, ids, mask)
        with pytest.raises(st.StoreLockedError):
            st.capture(model, CORPUS[:4], path, resume=True)
        run(model, ids, mask)  # the first writer goes on as if nothing happened
    assert not lock_exists(path)  # released on close
    ds = st.open(path)
    assert first.sequences == 4 and list(np.unique(ds.seq.values)) == [0, 1, 2, 3]
    st.verify(ds)
    with st.tap(model, path, append=True):  # free again
        run(model, ids, mask)
    assert st.open(path).attrs["committed_sequences"] == 6


def test_the_lock_is_released_when_the_block_raises_and_a_never_written_store_leaves_nothing(tmp_path):
    model = tiny_model("gpt2")
    path = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="user code"):
        with st.tap(model, path):
            raise RuntimeError("user code")
    assert not os.path.exists(path)  # the lock made the directory; nothing was written, so both are gone
    with pytest.raises(st.InputError):
        st.capture(model, [[1, 2, 3] * 100], path)  # refused before the first batch
    assert not os.path.exists(path)
    with pytest.raises(KeyError):
        with st.tap(model, path):
            run(model, *padded_batch(model.config.vocab_size, [4]))
            raise KeyError("after a batch")
    assert os.listdir(path) and not lock_exists(path)
    assert st.open(path).attrs["committed_tokens"] == 4


@pytest.mark.parametrize("writer", ["inline", "thread"])
def test_readers_open_a_store_while_it_is_being_written(writer, tmp_path, recwarn):
    model = tiny_model("llama")
    path = tmp_path / "s.zarr"
    with st.tap(model, path, writer=writer):
        for k in range(1, 4):  # this process reads its own writes, even those still queued or landing
            run(model, *padded_batch(model.config.vocab_size, [6, 2]))
            assert lock_exists(path)
            ds = st.open(path)
            assert ds.sizes["token"] == 8 * k
            st.verify(ds)
    assert not [w for w in recwarn if LOCK_NAME in str(w.message)]  # zarr sees the lock as a well-formed group


def _plant(path, **holder):
    os.makedirs(path, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": None, "started": time.time(),
              "token": "f" * 32, **holder}
    plant_lock(path, record)


def test_a_lock_from_another_host_needs_break_lock(tmp_path):
    model = tiny_model("gpt2")
    path = str(tmp_path / "s.zarr")
    st.capture(model, CORPUS[:3], path)
    _plant(path, host="gpu-node-17", pid=4242)
    with pytest.raises(st.StoreLockedError, match=r"pid 4242 on host 'gpu-node-17'.*break_lock=True \(--break-lock\)"):
        st.capture(model, CORPUS[:6], path, resume=True)
    assert committed(path) == 3
    with pytest.warns(UserWarning, match="break_lock=True"):
        st.capture(model, CORPUS[:6], path, resume=True, break_lock=True)
    assert committed(path) == 6 and not lock_exists(path)


def test_a_reused_pid_is_not_mistaken_for_the_writer(tmp_path):
    """Same host, and the pid runs, but it is another process (started at another time): stale."""
    model = tiny_model("gpt2")
    path = str(tmp_path / "s.zarr")
    st.capture(model, CORPUS[:3], path)
    _plant(path, pid=os.getpid(), proc_start=1)  # this process's pid, but not its start time
    with pytest.warns(UserWarning, match="no longer runs"):
        st.capture(model, CORPUS[:5], path, resume=True)
    assert committed(path) == 5


def test_a_writer_whose_lock_was_broken_stops_before_writing_more(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "s.zarr"
    ids, mask = padded_batch(model.config.vocab_size, [4, 4])
    with pytest.raises(st.StoreLockedError, match="was broken .* no batch is interleaved"):
        with st.tap(model, path, writer="inline"):
            run(model, ids, mask)
            _plant(path, host="elsewhere", pid=1)  # someone else took the store over (break_lock)
            run(model, ids, mask)
    assert committed(str(path)) == 2
    assert _lock(path)["host"] == "elsewhere"  # the other writer's lock is left alone
