"""The suite's layout (see tests/README.md):

- ``tests/unit``: no model at all, nothing builds or loads a transformers model;
- ``tests/integration``: tiny random models, in this process;
- ``tests/slow``: what starts other processes (SIGKILL, Ctrl-C, an S3 server, memory probes, ranks,
  a browser), mounts a filesystem or loads the real SmolLM2; marked ``slow`` here, so that
  ``pytest -m "not slow"`` is the quick run.

The shared helpers (``_util``, ``_analysis_util``, ``_crash``, ``_peers``, ...) live in ``tests/`` itself
(the benchmarks import some of them from there too) and are importable from every folder.
"""

import os
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
SLOW = os.path.join(TESTS, "slow")

if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if os.path.commonpath([str(item.path), SLOW]) == SLOW:
            item.add_marker(pytest.mark.slow)
