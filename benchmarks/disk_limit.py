"""Make the disk the bottleneck on purpose: a block-I/O write limit for this process and its children.

On the development machines the disk writes 1-2 GB/s and no capture ever waits on it, so "a capture
writes at N% of the disk's bandwidth when the disk is the bottleneck" cannot be seen without slowing
the disk down. The kernel's block-I/O throttle does that for one group of
processes, for direct I/O (which is what streamtap's local store writes with): cgroup v2's
``io.max`` (``wbps``) or cgroup v1's ``blkio.throttle.write_bps_device``. It needs root and a
mounted io/blkio controller; anything else is an error that says so, never a silent full-speed run.
"""

from __future__ import annotations

import os

V1 = "/sys/fs/cgroup/blkio"
V2_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
NAME = "streamtap-bench-disk-limit"


def whole_disk(path: str) -> str:
    """``major:minor`` of the disk that holds ``path`` (a partition's parent: throttles apply to disks)."""
    dev = os.stat(path).st_dev
    sys_dir = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if os.path.exists(os.path.join(sys_dir, "partition")):
        sys_dir = os.path.dirname(sys_dir)
    try:
        with open(os.path.join(sys_dir, "dev")) as f:
            return f.read().strip()
    except OSError as e:
        raise RuntimeError(f"--disk-limit: {path} is not on a block device ({e}); use a directory on a local disk (--dir)") from e


def limit_writes(path: str, bytes_per_second: int) -> str:
    """Put this process (and the children it starts from now on) under a write limit on ``path``'s
    disk; returns a description of the limit."""
    device = whole_disk(path)
    for root in V2_ROOTS:
        if os.path.exists(os.path.join(root, "cgroup.controllers")):
            with open(os.path.join(root, "cgroup.controllers")) as f:
                if "io" not in f.read().split():
                    continue
            group = os.path.join(root, NAME)
            rule_file, rule = os.path.join(group, "io.max"), f"{device} wbps={bytes_per_second}"
            break
    else:
        if not os.path.isdir(V1):
            raise RuntimeError("--disk-limit needs the io (cgroup v2) or blkio (cgroup v1) controller mounted; "
                               "none is on this machine: leave the option out")
        group = os.path.join(V1, NAME)
        rule_file, rule = os.path.join(group, "blkio.throttle.write_bps_device"), f"{device} {bytes_per_second}"
    try:
        os.makedirs(group, exist_ok=True)
        with open(rule_file, "w") as f:
            f.write(rule)
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError as e:
        raise RuntimeError(f"--disk-limit: could not set {rule_file} ({e}); it needs root: run as root or leave it out") from e
    return f"writes to disk {device} limited to {bytes_per_second / 1e6:,.0f} MB/s ({rule_file})"
