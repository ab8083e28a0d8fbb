"""Huge pages for torch's CPU tensors, asked for before torch allocates anything.

The mmap threshold a tap pins to keep memory flat (:func:`streamtap.writer.bound_allocator`) makes
every activation of a forward a fresh mapping, and with 4 KiB pages faulting them in made the
forward itself ~30% slower (GPT-2 shape, 8 x 256 tokens, this machine: 2.88-2.98 s against
2.11-2.36 s with glibc's defaults). torch can back its CPU tensors of 2 MiB and more with
transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``): 512 times fewer faults, and the same forward
took 2.32-2.40 s with a peak as flat as before (1,417 MiB; glibc's defaults 1,469-1,764 MiB).

torch reads the variable once, at its first allocation, which happens while torch is imported; so
streamtap sets it when it is imported before torch (the CLI always is). A session that imported
torch first keeps its pages as they are; exporting the variable in the shell covers that case.
``STREAMTAP_MALLOC_TUNING=0`` leaves it alone, as it leaves the allocator, and a value the user
set always wins.

Not in a virtual machine whose balloon hands freed memory back to the host as it is freed (virtio
free page reporting, which reports free 2 MiB blocks): there every freed huge page goes back to the
host and the next one is faulted in through the hypervisor. On such a machine (a Firecracker VM,
AMD EPYC) the same forward took 7.57-8.08 s with torch's huge pages, 6.53-6.87 s without them and
5.31-5.58 s with glibc's defaults (docs/pipeline.md). There the tap leaves glibc's heap alone as
well, by default (``streamtap.writer.mmap_threshold``).
"""

from __future__ import annotations

import glob
import os
import sys

VARIABLE = "THP_MEM_ALLOC_ENABLE"
BALLOON_FEATURES = "/sys/bus/virtio/drivers/virtio_balloon/virtio*/features"
FREE_PAGE_REPORTING = 5  # VIRTIO_BALLOON_F_REPORTING: a feature bit of the virtio spec


def host_takes_freed_memory(pattern: str = BALLOON_FEATURES) -> bool:
    """Whether a virtio balloon reports freed pages to the host (its negotiated features, one
    character per bit, name ``VIRTIO_BALLOON_F_REPORTING``)."""
    for path in glob.glob(pattern):
        try:
            with open(path) as f:
                bits = f.read().strip()
        except OSError:
            continue
        if len(bits) > FREE_PAGE_REPORTING and bits[FREE_PAGE_REPORTING] == "1":
            return True
    return False


def malloc_tuning() -> str | None:
    """``STREAMTAP_MALLOC_TUNING`` (lower case; "auto" when unset), or None when it turns the tuning off."""
    tuning = (os.environ.get("STREAMTAP_MALLOC_TUNING") or "auto").lower()
    return None if tuning in ("0", "false", "no", "off") else tuning


def ask_for_huge_pages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` for torch if torch has not been imported yet and the host
    keeps freed memory with the guest; returns whether it did."""
    if "torch" in sys.modules or VARIABLE in os.environ or malloc_tuning() is None:
        return False
    if host_takes_freed_memory():  # huge pages come back through the hypervisor each time: slower
        return False
    os.environ[VARIABLE] = "1"
    return True
