"""The benchmark's disk throttle (disk_limit.py, beside this file) writes the rule the kernel expects and
refuses loudly where it cannot throttle, so a "disk-bound" run never silently runs at full speed.
The cgroup trees here are directories of plain files standing in for /sys/fs/cgroup: what is
checked is what gets written where, not the kernel's throttling (the benchmark measures that)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import disk_limit  # noqa: E402


@pytest.fixture
def fake_disk(monkeypatch):
    monkeypatch.setattr(disk_limit, "whole_disk", lambda path: "254:0")


def test_cgroup_v2_gets_an_io_max_rule_and_this_process(tmp_path, monkeypatch, fake_disk):
    root = tmp_path / "v2"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu io memory\n")
    monkeypatch.setattr(disk_limit, "V2_ROOTS", (str(root),))
    said = disk_limit.limit_writes(str(tmp_path), 50_000_000)
    group = root / disk_limit.NAME
    assert (group / "io.max").read_text() == "254:0 wbps=50000000"
    assert (group / "cgroup.procs").read_text() == str(os.getpid())
    assert "50 MB/s" in said


def test_cgroup_v1_blkio_when_v2_has_no_io_controller(tmp_path, monkeypatch, fake_disk):
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("\n")  # a hybrid host: io stays with v1's blkio
    v1 = tmp_path / "blkio"
    v1.mkdir()
    monkeypatch.setattr(disk_limit, "V2_ROOTS", (str(v2),))
    monkeypatch.setattr(disk_limit, "V1", str(v1))
    disk_limit.limit_writes(str(tmp_path), 1_000_000)
    assert (v1 / disk_limit.NAME / "blkio.throttle.write_bps_device").read_text() == "254:0 1000000"


def test_no_controller_is_an_error_that_says_to_leave_the_option_out(tmp_path, monkeypatch, fake_disk):
    monkeypatch.setattr(disk_limit, "V2_ROOTS", (str(tmp_path / "nothing"),))
    monkeypatch.setattr(disk_limit, "V1", str(tmp_path / "no-blkio"))
    with pytest.raises(RuntimeError, match="leave the option out"):
        disk_limit.limit_writes(str(tmp_path), 1_000_000)


def test_a_directory_not_on_a_block_device_is_named():
    with pytest.raises(RuntimeError, match="not on a block device"):
        disk_limit.whole_disk("/proc/self")
