"""The coverage sweep's own per-type check (benchmarks/coverage_sweep.py) on a bounded sample: every
model type a layout family declares, plus a rotating handful of the rest chosen by today's date (the
seed is printed, so a failure can be re-run with COVERAGE_SEED). No type may tap without error and miss
its ground truth (WRONG), and every refusal must say why."""

import datetime
import os
import random
import sys
from pathlib import Path

from streamtap.layouts import supported_model_types

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import coverage_sweep  # noqa: E402

ROTATING = 6


def sample() -> tuple[list[str], int]:
    keys = coverage_sweep.all_keys()
    declared = set(supported_model_types())
    mine = [k for k in keys if k.split(":", 1)[1] in declared]
    rest = sorted(set(keys) - set(mine))
    seed = int(os.environ.get("COVERAGE_SEED", datetime.date.today().strftime("%Y%m%d")))
    return mine + random.Random(seed).sample(rest, min(ROTATING, len(rest))), seed


def test_no_type_is_silently_wrong():
    keys, seed = sample()
    print(f"coverage sample: {len(keys)} types, rotating subset seed COVERAGE_SEED={seed}")
    results: dict = {}
    coverage_sweep.sweep(keys, results, jobs=1, timeout=300, save=lambda: None)
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
