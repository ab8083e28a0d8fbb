"""The coverage sweep's own per-type check (benchmarks/coverage_sweep.py) on a bounded sample: every
layout a family file declares, each through one of its model types (which one rotates with today's
date), plus a rotating handful of the other types, taken in turn so that every one of them is checked
once in each cycle of days; the full list is the benchmark's. The seed (the day's number) is printed,
so a failure can be re-run with COVERAGE_SEED. No type may tap without error and miss its
ground truth (WRONG), and every refusal must say why. Two worker processes check the types in turn,
float32 only (the benchmark also measures bfloat16)."""

import datetime
import os
import random
import resource
import sys
import time
from pathlib import Path

from streamtap.layouts import LAYOUTS, supported_model_types

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import coverage_sweep  # noqa: E402

# The other types checked a day: the day's share of a fixed shuffle of them, so that ceil(len / ROTATING) days
# (38 for 114 types) check every one. Six drawn at random a day left some unchecked for months (the expected
# time to draw all 114 was about 100 days); three in turn cover them all in 38 and cost half the time.
ROTATING = 3


def sample() -> tuple[list[str], int]:
    """One key per declared layout (rotating among its types and heads), then the day's ``ROTATING`` others."""
    keys = coverage_sweep.all_keys()
    seed = int(os.environ.get("COVERAGE_SEED", datetime.date.today().toordinal()))
    rng = random.Random(seed)
    mine: list[str] = []
    for layout in LAYOUTS:
        if layout.inferred:
            continue
        own = [k for k in keys if k.split(":", 1)[1] in layout.model_types]
        if own and not set(own) & set(mine):
            mine.append(rng.choice(own))
    declared = set(supported_model_types())
    hung = {k for k, r in coverage_sweep.load().items() if "hung" in r.get("reason", "")}  # the benchmark re-checks those
    rest = sorted(k for k in keys if k.split(":", 1)[1] not in declared and k not in hung)
    random.Random(0).shuffle(rest)   # the same order every day: the days' shares partition it
    turns = max(1, -(-len(rest) // ROTATING))
    day = seed % turns
    return mine + rest[day * ROTATING:(day + 1) * ROTATING], seed


def test_no_type_is_silently_wrong():
    keys, seed = sample()
    print(f"coverage sample: {len(keys)} types, rotating subset seed COVERAGE_SEED={seed}")
    results: dict = {}
    start, cpu = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    coverage_sweep.sweep(keys, results, jobs=2, timeout=300, save=lambda: None, half=False)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
    print(f"coverage sample: {time.time() - start:.0f} s wall, {cpu_s:.0f} CPU s in the workers")
    assert set(results) == set(keys)
    wrong = {k: r["reason"] for k, r in results.items() if r["class"] == "WRONG"}
    assert not wrong, f"tapped without error but wrong (seed {seed}): {wrong}"
    for key, r in results.items():
        if r["class"] in ("refused", "not-tiny", "crashed"):
            assert r.get("reason", "").strip(), f"{key}: {r['class']} without a reason"
    declared = set(supported_model_types())
    unbound = [k for k, r in results.items()
               if k.split(":", 1)[1] in declared and r["class"] == "refused" and r["reason"] == "no layout"]
    assert not unbound, f"a family declares these types but layout_for found none: {unbound}"
