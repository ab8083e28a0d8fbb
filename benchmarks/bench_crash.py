"""Fault injection at scale: SIGKILL a capture N times at random moments, count intact stores.

    python benchmarks/bench_crash.py [--kills 100] [--seed 0]

After every kill the store must open, every committed token must verify, and the final resumed
capture must equal a single uninterrupted one (no sequence duplicated or missing). A killed writer
leaves its lock behind; the next capture of the store takes it over with a warning, as a user's resume
would.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _crash import CORPUS, committed, kill_during_capture  # noqa: E402

import streamtap as st  # noqa: E402
from streamtap.models import tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="streamtap-crash-")
    st.capture(tiny_model("llama"), CORPUS, os.path.join(work, "reference.zarr"), batch_size=2)
    reference = st.open(os.path.join(work, "reference.zarr"))
    intact = restarts = 0
    path = os.path.join(work, "run-0.zarr")
    started = time.perf_counter()
    for kill in range(args.kills):
        if committed(path) >= len(CORPUS):  # this capture finished between kills: start another
            restarts += 1
            path = os.path.join(work, f"run-{restarts}.zarr")
        delay = kill_during_capture(path, rng)
        try:
            ds = st.open(path)
            assert ds.sizes["token"] == sum(len(t) for t in CORPUS[:committed(path)])
            st.verify(ds)
            intact += 1
        except Exception as exc:  # a damaged store: report it, keep counting
            print(f"kill {kill} (after {delay} ms): store damaged: {type(exc).__name__}: {exc}", flush=True)
    finals = 0
    for i in range(restarts + 1):
        run = os.path.join(work, f"run-{i}.zarr")
        st.capture(tiny_model("llama"), CORPUS, run, batch_size=2, resume=True)
        ds = st.open(run)
        same = (np.array_equal(ds.seq.values, reference.seq.values)
                and np.array_equal(ds.token_id.values, reference.token_id.values))
        finals += bool(same)
    shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {time.perf_counter() - started:.0f} s")
    print(f"kills: {args.kills}, stores intact after the kill: {intact}/{args.kills}, "
          f"resumed captures equal to an uninterrupted one: {finals}/{restarts + 1}")


if __name__ == "__main__":
    main()
