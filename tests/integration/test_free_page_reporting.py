"""Freed guest memory goes back to the host while the VM runs (virtio-balloon free page
reporting, in blocks of 128 KiB): a guest that fills and frees
256 MiB leaves its QEMU about as large as before, and its standby state no larger than
before the fill."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import run, sh
from torpor.manager import InstanceManager

pytestmark = pytest.mark.qemu
FILL_MIB = 256
FILL = (f"mkdir -p /mnt/fill && mount -t tmpfs -o size={FILL_MIB + 32}m tmpfs /mnt/fill && "
        f"dd if=/dev/urandom of=/mnt/fill/x bs=1M count={FILL_MIB} 2>/dev/null && "
        "echo filled")  # random: neither QEMU nor the zero-page filter can skip it
FREE = "rm /mnt/fill/x && umount /mnt/fill && echo freed"
RETURN_SLACK_MIB = 16  # what the host may not have back yet when the wait ends


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def state_bytes(manager: InstanceManager, name: str) -> int:
    """The standby state's size on disk (what a standby stores)."""
    run(manager.standby(name))
    size = sum(f.stat().st_blocks * 512 for f in manager.paths(name).standby_dir.iterdir())
    run(manager.restore(name))
    return size


def test_a_guest_gives_freed_memory_back_and_its_standby_state_stays_small(
        manager: InstanceManager, fresh_name: str) -> None:
    run(manager.create(fresh_name, memory_bytes=512 << 20))
    try:
        run(manager.start(fresh_name))
        assert run(manager.get(fresh_name)).pid is not None
        # The initrd shrank the guest's per-CPU free lists (pages there are never reported)
        assert sh(manager, fresh_name,
                  "cat /proc/sys/vm/percpu_pagelist_high_fraction").strip() == "1000000"
        booted_state = state_bytes(manager, fresh_name)
        pid = run(manager.get(fresh_name)).pid
        assert pid is not None
        before_fill = rss_mib(pid)
        assert sh(manager, fresh_name, FILL).strip() == "filled"
        assert rss_mib(pid) > before_fill + FILL_MIB * 0.75  # the fill is in host memory
        assert sh(manager, fresh_name, FREE).strip() == "freed"
        # The guest reports freed blocks about 2 s after they are freed, in batches, and
        # QEMU discards each: wait until the host has (nearly) all of it back.
        deadline = time.monotonic() + 60
        while rss_mib(pid) > before_fill + RETURN_SLACK_MIB:
            assert time.monotonic() < deadline, (before_fill, rss_mib(pid))
            time.sleep(0.5)
        after = state_bytes(manager, fresh_name)
        # Freed pieces down to 128 KiB are reported (the initrd sets the order and keeps
        # the per-CPU lists small): none of the freed data is left to save. Measured:
        # -3.6 MiB (-2.4 with the default per-CPU lists, +2.6 with 2 MiB blocks as well);
        # but up to RETURN_SLACK_MIB of it may not be reported yet when the wait ends,
        # and the guest's own work between the two saves (the commands' page cache,
        # slab) moves the state a little either way (CI once: +1.4 MiB). Kept, the freed
        # data would add FILL_MIB. (The bar "no larger" is make bench-memory's.)
        print("state before, after:", booted_state, after)
        assert after <= booted_state + (RETURN_SLACK_MIB << 20), (booted_state, after)
        assert run(manager.get(fresh_name)).pid != pid  # it was standby + restore
    finally:
        run(manager.delete(fresh_name, force=True))
