"""Fault injection: run a capture in a child process and SIGKILL it at a random moment.

Shared by tests/slow/test_crash.py (a handful of kills) and benchmarks/bench_crash.py (a hundred).
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time

CORPUS = [[(11 * i + 3 * j) % 120 + 1 for j in range(4 + i % 7)] for i in range(60)]

CHILD = textwrap.dedent("""
    import sys, streamtap as st
    from streamtap.models import tiny_model
    sys.path.insert(0, {tests!r})
    from _crash import CORPUS
    model = tiny_model("llama")
    print("capturing", flush=True)  # start-up done: see wait_for_a_commit
    {before}
    st.capture(model, CORPUS, {path!r}, batch_size=2, resume=True{options})
    print("finished", flush=True)
""")


def committed(path: str) -> int:
    """Sequences committed in the store at ``path`` (a directory or an s3:// URL); 0 before it exists."""
    from streamtap.io.location import open_group

    try:
        return int(open_group(path, mode="r").attrs["committed_sequences"])
    except Exception:
        return 0


def start_capture(path: str, *, stderr=subprocess.DEVNULL, options: str = "", before: str = "") -> subprocess.Popen:
    """A child process that captures CORPUS into ``path`` (resuming what is there); ``options``: more
    keyword arguments of ``st.capture`` as text (``", summarise=True"``), ``before``: a line run first."""
    tests = os.path.dirname(os.path.abspath(__file__))
    child = CHILD.format(tests=tests, path=path, options=options, before=before or "pass")
    return subprocess.Popen([sys.executable, "-c", child],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def wait_for_a_commit(child: subprocess.Popen, path: str, start: int, timeout: float = 120.0) -> None:
    """Return once ``child`` has committed a batch beyond ``start`` sequences: it is in its write loop."""
    deadline = time.monotonic() + timeout
    # The child's start-up (imports, the model) writes nothing: wait for its "capturing" line, then poll.
    # Polling all along cost as much as the child's start-up itself on S3 (a request every few ms, served
    # in this process). A child that dies first ends the pipe, which wakes select at once; the deadline holds.
    if child.stdout is not None:
        if select.select([child.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            child.stdout.readline()
    while committed(path) == start and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


def kill_during_capture(path: str, rng: random.Random, *, timeout: float = 120.0, options: str = "") -> int:
    """Start (or resume) a capture into ``path`` and SIGKILL it once it is writing; returns the kill delay in ms."""
    start = committed(path)
    child = start_capture(path, options=options)
    wait_for_a_commit(child, path, start, timeout)
    delay_ms = rng.randint(0, 40)
    time.sleep(delay_ms / 1000)
    child.send_signal(signal.SIGKILL)
    child.wait()
    return delay_ms
