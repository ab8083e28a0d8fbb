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


# The longest tests, with their seconds in CI (order only: nothing here changes what a test checks). Run first,
# they keep both xdist workers busy to the end: one started last would leave the other worker idle for as long.
LONGEST = {
    "tests/slow/test_examples_analysis.py::test_effects": 105,
    "tests/slow/test_coverage_sample.py::test_no_type_is_silently_wrong": 88,
    "tests/slow/test_docs.py::test_every_python_block_runs_as_written[README.md]": 50,
    "tests/slow/test_crash.py::test_killed_captures_open_verify_and_resume_exactly": 38,
    "tests/slow/test_crash.py::test_killed_summarising_captures_resume_to_the_summaries_of_one_capture": 35,
    "tests/slow/test_ctrl_c.py::test_ctrl_c_leaves_a_store_that_opens_verifies_and_resumes": 31,
    "tests/slow/test_docs.py::test_every_python_block_runs_as_written[docs/analysis.md]": 31,
    "tests/slow/test_mistakes.py::test_report_uses_the_stores_tokenizer_offline_and_else_the_stored_text": 28,
    "tests/slow/test_examples_analysis.py::test_attention_sinks": 22,
    "tests/slow/test_s3.py::test_resume_after_killed_writers_on_s3": 20,
    "tests/slow/test_examples_analysis.py::test_induction_circuit": 20,
    "tests/slow/test_smollm2.py::test_demo_on_smollm2_finds_paris": 19,
    "tests/slow/test_peak_memory.py::test_peak_memory_does_not_grow_with_the_number_of_tokens": 17,
}


def _seconds(item) -> int:
    """The CI seconds of ``item`` (a parametrised test matches by its own id, else by its function's)."""
    nodeid = item.nodeid.replace(os.sep, "/")
    return LONGEST.get(nodeid, LONGEST.get(nodeid.split("[", 1)[0], 0))


def _longest_first(items) -> None:
    """Sort ``items`` longest first, keeping each module's tests together (its module fixtures are made once per
    worker run of them): modules by their longest known test, then the rest of tests/slow, then everything else,
    each module's known long tests first and otherwise the collection's order. xdist hands the tests out in this
    order, a few at a time to whichever worker is nearly idle (longest-first list scheduling)."""
    module_seconds: dict = {}
    for item in items:
        module_seconds[item.path] = max(module_seconds.get(item.path, 0), _seconds(item))
    order = {id(item): i for i, item in enumerate(items)}

    def key(item):
        slow = os.path.commonpath([str(item.path), SLOW]) == SLOW
        return (-module_seconds[item.path], not slow, str(item.path) if module_seconds[item.path] else "",
                -_seconds(item), order[id(item)])
    items.sort(key=key)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if os.path.commonpath([str(item.path), SLOW]) == SLOW:
            item.add_marker(pytest.mark.slow)
    _longest_first(items)
