"""Host memory conditions for the benchmarks: detect a host that hands free memory back to
its hypervisor, and warm memory up before a measured restore.

On a VM host whose balloon reports free pages (virtio-balloon feature 5, free page
reporting), the kernel hands memory that has stayed free for ~2 s back to the hypervisor,
and the next process to touch it waits while the hypervisor backs it again: here, 320 MiB
take 40 ms to touch when freed 0.1 s earlier and 0.3-0.7 s when freed seconds earlier. A
restore allocates the guest's RAM afresh, so which of those it gets decides the result more
than the method does. Touching and freeing enough memory right before each restore, for
every method alike, makes every restore allocate memory the hypervisor still backs.
"""

from __future__ import annotations

import mmap
from pathlib import Path

_VIRTIO_BALLOON = 0x0005
_F_FREE_PAGE_REPORTING = 5
_MADV_POPULATE_WRITE = 23  # Linux 5.14; not named by Python 3.11's mmap module


def reports_free_pages() -> bool:
    """Whether a virtio balloon with free page reporting is bound on this host."""
    for device in Path("/sys/bus/virtio/devices").glob("*"):
        try:
            kind = int((device / "device").read_text(), 16)
            features = (device / "features").read_text().strip()
        except (OSError, ValueError):
            continue
        if (kind == _VIRTIO_BALLOON and len(features) > _F_FREE_PAGE_REPORTING
                and features[_F_FREE_PAGE_REPORTING] == "1"):
            return True
    return False


def warm_up(size: int) -> None:
    """Touch `size` bytes of fresh memory (huge pages, as QEMU asks for guest RAM) and
    free them: the allocations that follow within the next second get that memory."""
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
        region.madvise(_MADV_POPULATE_WRITE)
    finally:
        region.close()
