"""streamtap leaves the process alone: importing it, its pytest plugin and a whole tap change no
environment variable, warning filter or allocator setting (each checked in a fresh child process)."""

import json
import os
import subprocess
import sys

import pytest


def test_importing_and_tapping_leave_the_process_as_they_found_it():
    # a library imported next to someone's training job must not change its environment, allocator
    # or warnings: compare them around an import of streamtap, its pytest plugin and a whole tap
    probe = r"""
import json, os, warnings
def state():
    return {"environ": dict(os.environ), "filters": [repr(f) for f in warnings.filters]}
baseline = state()
import streamtap, streamtap.pytest_plugin   # first, before torch (where a library might still set things up)
after_import = state()
# what the host itself imports and does: its libraries set their own filters and caches
import dask.array, nnsight, torch, transformers, xarray, zarr
from streamtap.models import tiny_model
model = tiny_model("gpt2")
import tempfile
with tempfile.TemporaryDirectory() as d:  # xarray adds a filter of its own whenever it decodes a variable
    xarray.Dataset({"x": ("t", [1.0])}).to_zarr(os.path.join(d, "x.zarr"))
    xarray.open_zarr(os.path.join(d, "x.zarr")).load()
before_tap = state()
with tempfile.TemporaryDirectory() as d:
    with torch.no_grad(), streamtap.tap(model, os.path.join(d, "s.zarr")):
        model(input_ids=torch.ones((1, 5), dtype=torch.long))
    streamtap.verify(streamtap.open(os.path.join(d, "s.zarr")))
    # summaries fold on the CPU with numba's kernel: its import and compilation set filters of their own
    with torch.no_grad(), streamtap.tap(model, os.path.join(d, "n.zarr"), neurons=True, summarise=True):
        model(input_ids=torch.ones((1, 5), dtype=torch.long))
after_tap = state()
print(json.dumps({"baseline": baseline, "import": after_import, "before_tap": before_tap, "tap": after_tap}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_", "STREAMTAP_"))}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["import"] == got["baseline"]
    assert got["tap"] == got["before_tap"]


def test_the_allocator_is_never_tuned_by_the_library():
    # glibc's mmap threshold is dynamic: after a 4 MiB block is freed it rises, and the next 4 MiB
    # block comes from the heap. A tap that pinned the threshold (mallopt) would keep it a mapping.
    probe = r"""
import ctypes, os, tempfile, torch
import streamtap
from streamtap.models import tiny_model
class M(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = M
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
model = tiny_model("gpt2")
with tempfile.TemporaryDirectory() as d:
    with torch.no_grad(), streamtap.tap(model, os.path.join(d, "s.zarr")):
        model(input_ids=torch.ones((1, 5), dtype=torch.long))
p = libc.malloc(4 << 20); libc.free(p)      # glibc raises its threshold above 4 MiB here
before = libc.mallinfo2().hblks
p = libc.malloc(4 << 20)                     # so this one comes from the heap, not a new mapping
print(libc.mallinfo2().hblks - before)
libc.free(p)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_", "STREAMTAP_"))}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    if "mallinfo2" in result.stderr:
        pytest.skip("not glibc >= 2.33 (no mallinfo2): nothing the library could have tuned")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "0"  # the dynamic threshold is glibc's own: no new mapping
