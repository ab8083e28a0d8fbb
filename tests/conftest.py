"""Suite-wide settings for parallel runs. ./test.sh runs the tests with pytest-xdist, one worker per
core. Each worker is pinned to a core of its own and keeps torch to one intra-op thread, so that the
workers do not fight over the cores, and so that what depends on the cores a process has decides as
in a serial run here: with torch on every core it may use, ``writer="auto"`` finds no spare core and
writes inline in a worker as it does in a plain ``pytest`` on this machine. Child processes a test
starts inherit the worker's core."""

import os


def _pin_to_one_core(worker: int) -> None:
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux: nothing to pin
        return
    core = {cores[worker % len(cores)]}
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for tid in tasks:  # every thread the worker already runs, and (inherited) all it starts later
        try:
            os.sched_setaffinity(int(tid), core)
        except OSError:  # a thread that ended meanwhile
            pass


def pytest_configure(config):
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... in an xdist worker
    if not worker:
        return
    _pin_to_one_core(int(worker.removeprefix("gw") or 0))
    import torch

    torch.set_num_threads(1)


# Modules with the longest tests (child processes killed and resumed, the memory probes, S3): in a
# parallel run they go first, so that the workers end together on the many short tests, not one of them
# on a long test while the other waits. The order within a module stays as written.
FIRST = ("test_s3.py", "test_pipeline.py", "test_crash.py", "test_cli.py", "test_lock.py", "test_distributed.py",
         "test_examples_analysis.py", "test_report.py")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: same order in every worker
