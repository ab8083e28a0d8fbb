"""Background writes of a local store (streamtap.io.direct.BackgroundWrites): a commit lands after its
chunks, and never after a chunk of its batch failed."""

import threading
import time

import pytest

from streamtap.io.direct import BackgroundWrites


def test_background_writes_land_the_commit_after_its_chunks_and_drop_it_after_a_failure():
    order, gate = [], threading.Event()

    def chunk(name, wait=False, fail=False):
        if wait:
            gate.wait(5)
        if fail:
            raise OSError(28, "No space left on device")
        order.append(name)

    bg = BackgroundWrites(workers=4)
    bg.submit(chunk, "c0", True, barrier=False)  # held until the gate opens
    bg.submit(chunk, "c1", barrier=False)
    bg.submit(chunk, "commit1", barrier=True)
    bg.submit(chunk, "c2", barrier=False)
    time.sleep(0.2)
    assert order == ["c1"]  # the commit waits for c0, and c2 (the next batch) for the commit
    gate.set()
    bg.settle()
    assert order == ["c1", "c0", "commit1", "c2"]

    order.clear()
    bg.submit(chunk, "c3", False, True, barrier=False)  # a chunk that fails
    bg.submit(chunk, "c4", barrier=False)
    bg.submit(chunk, "commit2", barrier=True)
    bg.submit(chunk, "c5", barrier=False)
    with pytest.raises(OSError, match="No space"):
        bg.settle()
    assert "commit2" not in order and "c5" not in order  # never a commit without its chunks
    bg.settle()  # raised once; the writer has taken it
    bg.shutdown()
