"""Snapshot and fork benchmark (issue: stored snapshots, overlap, fork).

1. Paused window of a running-source snapshot, overlapped vs serial, for a 2 GiB guest
   (1 GiB of its RAM random) whose disk is 8 GiB apparent with 2 GiB of data, on the
   data root's filesystem (ext4 here), with "save alone" and "copy alone" (the whole
   instance directory, disk included, VM paused) measured with the same functions; the
   bar is overlapped ≤ 1.15 × max(save alone, copy alone). Overlapped, the pause ends
   once the state is saved and the disk frozen; the disk copy goes on with the guest
   running, so the snapshot's total time (until it is published) is shown too. Page cache
   is dropped before each measurement.
2. Fork of a running 512 MiB guest into 1 and into 4 running copies: time until every
   fork's guest agent answers.

    .venv/bin/python -m bench.snapshot_bench [--runs 3] [--disk-data 2048] [--ram-data 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from torpor.hypervisor.qmp import Monitor
from torpor.instances.context import Settings
from torpor.instances.metadata import CompressionPolicy
from torpor.instances.runtime import load_runtime
from torpor.instances.states import Action
from torpor.machinestate.stream import prepare_outgoing
from torpor.manager import InstanceManager
from torpor.operations.snapshots import copy_leg, save_leg


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


async def leg_alone(mgr: InstanceManager, name: str, work: Path, leg: str) -> float:
    """One leg exactly as a snapshot runs it (same functions, same options), paused."""
    target = Path(tempfile.mkdtemp(dir=work)) / "out"
    async with mgr.registry.locked(name, Action.CONFIGURE) as ctx, \
            Monitor.connect(ctx.paths.qmp_socket) as mon:
        record = load_runtime(ctx.paths)
        assert record is not None
        await prepare_outgoing(mon, record.vm_config)
        drop_caches()
        start = time.monotonic()
        await mon.pause()
        if leg == "save":
            await save_leg(mon, record, target, CompressionPolicy())
        else:
            await copy_leg(ctx, target)
        elapsed = time.monotonic() - start
        await mon.resume()
    shutil.rmtree(target.parent)
    return elapsed


TOTALS: dict[str, list[float]] = {}  # snapshot rows: call → published


async def snapshot_window(mgr: InstanceManager, name: str, serial: bool, i: int) -> float:
    drop_caches()
    start = time.monotonic()
    record = await mgr.snapshot_create(name, f"{'ser' if serial else 'ovl'}-{i}", serial=serial)
    TOTALS.setdefault("serial" if serial else "overlapped", []).append(time.monotonic() - start)
    await mgr.snapshot_delete(record.id)
    return record.phases["paused_window"]


async def fork_time(mgr: InstanceManager, name: str, count: int) -> float:
    start = time.monotonic()
    forks = await mgr.fork(name, f"f{count}", count=count)  # returns once every agent answers
    elapsed = time.monotonic() - start
    for f in forks:
        await mgr.delete(f.name, force=True)
    return elapsed


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--disk-data", type=int, default=2048, help="MiB written to the disk")
    parser.add_argument("--ram-data", type=int, default=1024, help="MiB of random guest RAM")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tp-snapbench-", dir="/var/tmp"))
    mgr = InstanceManager(work / "data", Settings(accel="tcg"))
    try:
        print("preparing the 2 GiB guest ...", file=sys.stderr)
        await mgr.create("big", memory_bytes=2 << 30, disk_bytes=8 << 30)
        await mgr.start("big")
        await mgr.exec("big", ["sh", "-c",
                               f"dd if=/dev/urandom of=/root/data bs=1M count={args.disk_data}"
                               f" 2>/dev/null; sync; dd if=/dev/urandom of=/tmp/ram bs=1M"
                               f" count={args.ram_data} 2>/dev/null"], timeout=1800)
        async def measure(label: str, i: int) -> float:
            if label in ("save alone", "copy alone"):
                return await leg_alone(mgr, "big", work, label.split()[0])
            return await snapshot_window(mgr, "big", label.endswith("serial"), i)

        rows: dict[str, list[float]] = {}
        for label in ("save alone", "copy alone", "snapshot overlapped", "snapshot serial"):
            print(f"measuring {label} ...", file=sys.stderr)
            rows[label] = [await measure(label, i) for i in range(args.runs)]
        await mgr.delete("big", force=True)
        print("preparing the 512 MiB guest ...", file=sys.stderr)
        await mgr.create("small")
        await mgr.start("small")
        forks = {n: [await fork_time(mgr, "small", n) for _ in range(args.runs)] for n in (1, 4)}
        restore = []
        for _ in range(args.runs):
            await mgr.standby("small")
            info = await mgr.restore("small")
            assert info.last_operation is not None
            restore.append(info.last_operation.phases["restore_to_agent"])
    finally:
        for info in await mgr.list_all():
            await mgr.delete(info.name, force=True)
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in rows.items()}
    bound = max(med["save alone"], med["copy alone"])
    print(f"\n2 GiB guest, {args.ram_data} MiB random RAM, disk 8 GiB apparent with "
          f"{args.disk_data} MiB data; paused window, medians of {args.runs} (cold cache)")
    print(f"{'measure':22} {'median s':>9} {'min s':>7} {'max s':>7} {'/ max(save, copy)':>18}"
          f" {'total s':>8}")
    for label, values in rows.items():
        totals = TOTALS.get(label.split()[-1])
        total = f"{statistics.median(totals):8.3f}" if totals else f"{'':8}"
        print(f"{label:22} {med[label]:9.3f} {min(values):7.3f} {max(values):7.3f} "
              f"{med[label] / bound:17.2f}x {total}")
    print("total s: snapshot call until published (overlapped: the disk copy and the fold-back"
          " of the overlay run after the pause)")
    print(f"\nfork of a running 512 MiB guest (until every fork's agent answers), medians of "
          f"{args.runs}")
    print(f"{'forks':22} {'median s':>9} {'min s':>7} {'max s':>7}")
    for n, values in forks.items():
        print(f"{n:<22} {statistics.median(values):9.3f} {min(values):7.3f} {max(values):7.3f}")
    print(f"{'(one restore)':22} {statistics.median(restore):9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
