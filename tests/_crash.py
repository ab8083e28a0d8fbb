"""Fault injection: run a capture in a child process and SIGKILL it at a random moment.

Shared by tests/test_crash.py (a handful of kills) and benchmarks/bench_crash.py (a hundred).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import zarr

CORPUS = [[(11 * i + 3 * j) % 120 + 1 for j in range(4 + i % 7)] for i in range(60)]

CHILD = textwrap.dedent("""
    import sys, streamtap as st
    from streamtap.models import tiny_model
    sys.path.insert(0, {tests!r})
    from _crash import CORPUS
    st.capture(tiny_model("llama"), CORPUS, {path!r}, batch_size=2, resume=True)
    print("finished", flush=True)
""")


def committed(path: str) -> int:
    try:
        return int(zarr.open_group(path, mode="r").attrs["committed_sequences"])
    except Exception:
        return 0


def kill_during_capture(path: str, rng: random.Random, *, timeout: float = 120.0) -> int:
    """Start (or resume) a capture into ``path`` and SIGKILL it once it is writing; returns the kill delay in ms."""
    tests = os.path.dirname(os.path.abspath(__file__))
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=tests, path=path)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    start = committed(path)
    deadline = time.monotonic() + timeout
    while committed(path) == start and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)  # wait until this child has committed a batch: it is in its write loop
    delay_ms = rng.randint(0, 40)
    time.sleep(delay_ms / 1000)
    child.send_signal(signal.SIGKILL)
    child.wait()
    return delay_ms
