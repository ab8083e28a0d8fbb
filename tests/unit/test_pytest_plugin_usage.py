"""The pytest plugin's --streamtap-verify given a path that is no store: a usage error that names it
(no store, no model; the plugin on real stores: tests/integration/test_pytest_plugin.py)."""

import pytest

# What the plugin imports to look at a store, imported here first (integration/test_pytest_plugin.py's
# store fixture does the same): pytester drops the modules first imported inside an in-process run, and
# with those dropped, the next in-process run in this process did not load the installed streamtap
# plugin at all ("unrecognized arguments: --streamtap-verify").
import streamtap.dataset  # noqa: F401

pytest_plugins = ["pytester"]


@pytest.mark.parametrize("target, message", [
    ("missing.zarr", "*--streamtap-verify missing.zarr: no such file or directory*"),
    ("plain_dir", "*--streamtap-verify plain_dir: no streamtap store at*"),
    ("file.txt", "*--streamtap-verify file.txt: not a directory*"),
], ids=["missing", "not-zarr", "file"])
def test_a_path_that_is_no_store_is_a_usage_error(pytester, target, message):
    (pytester.path / "plain_dir").mkdir()
    (pytester.path / "file.txt").write_text("x")
    result = pytester.runpytest_inprocess("--streamtap-verify", target)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
