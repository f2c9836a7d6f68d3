"""Host memory of idle guests: what a running guest keeps after it used and freed memory,
with virtio-balloon free page reporting (the default for anonymous-RAM instances) and
without it, same run, same guests.

    make bench-memory        (python -m bench.memory_bench [--count 2] [--memory 2G]
                              [--fill 512])

Per guest: QEMU's PSS right after boot (agent up), after the guest wrote --fill MiB of
random data to a tmpfs, and 20 s after it freed them; and the standby state's size on
disk before the fill and after the free. Printed per mode, summed over --count guests.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import pss_bytes, remove_work, scratch_manager
from torpor.manager import InstanceManager
from torpor.units import parse_size

SETTLE = 20.0  # s after the free: the guest reports freed blocks after ~2 s, in batches


def pss_mib(pid: int) -> float:
    return pss_bytes(pid) / (1 << 20)


def state_mib(manager: InstanceManager, name: str) -> float:
    asyncio.run(manager.standby(name))
    size = sum(f.stat().st_blocks * 512 for f in manager.paths(name).standby_dir.iterdir())
    asyncio.run(manager.restore(name))
    return size / (1 << 20)


def pid(manager: InstanceManager, name: str) -> int:
    found = asyncio.run(manager.get(name)).pid
    if found is None:
        raise SystemExit(f"{name} is not running")
    return found


def sh(manager: InstanceManager, name: str, script: str) -> None:
    result = asyncio.run(manager.exec(name, ["sh", "-c", script], timeout=600))
    if result.exit_code != 0:
        raise SystemExit(f"{name}: {script}: {result.stderr.decode()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--fill", type=int, default=512, help="MiB written, then freed")
    args = parser.parse_args()
    memory = parse_size(args.memory, "M")
    work, manager = scratch_manager("tpmem-")
    fill = (f"mkdir -p /mnt/fill && mount -t tmpfs -o size={args.fill + 64}m tmpfs /mnt/fill"
            f" && dd if=/dev/urandom of=/mnt/fill/x bs=1M count={args.fill} 2>/dev/null")
    try:
        print(f"\n## {args.count} idle guests of {memory >> 20} MiB, wrote and freed "
              f"{args.fill} MiB each (sums, MiB)\n")
        print(f"{'free page reporting':<20} {'PSS booted':>11} {'PSS filled':>11} "
              f"{'PSS freed':>10} {'freed/booted':>13} {'state before':>13} "
              f"{'state after':>12}")
        for reporting in (False, True):
            names = [f"m{int(reporting)}-{i}" for i in range(args.count)]
            for name in names:
                asyncio.run(manager.create(name, memory_bytes=memory))
                paths = manager.paths(name)
                meta = manager.registry.find(name)
                meta.free_page_reporting = reporting  # the baseline: no balloon device
                meta.save(paths.metadata)
                asyncio.run(manager.start(name))
            booted = sum(pss_mib(pid(manager, n)) for n in names)
            before = sum(state_mib(manager, n) for n in names)  # restored: new QEMUs
            pids = [pid(manager, n) for n in names]
            for name in names:
                sh(manager, name, fill)
            filled = sum(pss_mib(p) for p in pids)
            for name in names:
                sh(manager, name, "rm /mnt/fill/x && umount /mnt/fill")
            time.sleep(SETTLE)
            freed = sum(pss_mib(p) for p in pids)
            after = sum(state_mib(manager, n) for n in names)
            print(f"{'on' if reporting else 'off':<20} {booted:>11.0f} {filled:>11.0f} "
                  f"{freed:>10.0f} {freed / booted:>12.2f}x {before:>13.0f} {after:>12.0f}")
            for name in names:
                asyncio.run(manager.delete(name, force=True))
    finally:
        remove_work(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
