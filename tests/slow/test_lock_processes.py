"""One writer per store, across processes: two writer processes started together, one writes and the
other is refused; a lock left by a SIGKILLed writer is taken over on resume."""

import os
import random
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import streamtap as st
from streamtap.models import tiny_model

from _crash import CORPUS, committed, kill_during_capture
from _util import lock_exists, lock_holder


TWO_WRITERS = textwrap.dedent("""
    import os, sys, time, torch, streamtap as st
    from streamtap.models import tiny_model
    model = tiny_model("llama")
    print("ready", flush=True)
    while not os.path.exists({go!r}):  # both start writing at the same moment
        time.sleep(0.001)
    try:
        with st.tap(model, {path!r}, append=True) as tap:
            for i in range(6):
                model(input_ids=torch.full((1, 3), i + 1))
                time.sleep(0.2)
        print("done", tap.sequences, flush=True)
    except st.StoreLockedError as exc:
        print("refused", exc, flush=True)
""")


def test_two_writer_processes_started_together_one_writes_the_other_is_refused(tmp_path):
    path, go = str(tmp_path / "s.zarr"), str(tmp_path / "go")
    code = TWO_WRITERS.format(path=path, go=go)
    children = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(2)]
    for child in children:
        assert child.stdout.readline().strip() == "ready"
    open(go, "w").close()
    outs = [c.communicate(timeout=300) for c in children]
    lines = sorted(out.strip().splitlines()[-1] for out, _ in outs)
    assert lines[0] == "done 6", outs
    assert lines[1].startswith("refused ") and "is being written by another streamtap writer" in lines[1], outs
    ds = st.open(path)
    assert ds.attrs["committed_sequences"] == 6 and ds.sizes["token"] == 18
    np.testing.assert_array_equal(ds.seq.values, np.repeat(np.arange(6), 3))  # one writer's batches, in order
    np.testing.assert_array_equal(ds.token_id.values, np.repeat(np.arange(1, 7), 3))
    st.verify(ds)
    assert not lock_exists(path)


def test_a_lock_left_by_a_killed_writer_is_taken_over_on_resume(tmp_path):
    path = str(tmp_path / "run.zarr")
    kill_during_capture(path, random.Random(7))
    holder = lock_holder(path)  # SIGKILL leaves the lock behind, naming a process that no longer runs
    assert holder["host"] == socket.gethostname() and holder["pid"] != os.getpid()
    before = committed(path)
    with pytest.warns(UserWarning, match=rf"taking over the lock .*pid {holder['pid']} .* no longer runs"):
        st.capture(tiny_model("llama"), CORPUS, path, batch_size=2, resume=True)
    assert not lock_exists(path)
    ds = st.open(path)
    assert 0 < before < len(CORPUS) == ds.attrs["committed_sequences"]
    np.testing.assert_array_equal(ds.seq.values, np.repeat(np.arange(len(CORPUS)), [len(t) for t in CORPUS]))
    st.verify(ds)
