"""Stored-snapshot compression benchmark: what a compressed snapshot saves on disk and
costs at fork time, against a raw one of the same guest, in the same run.

A guest (512 MiB by default) is booted and given data in RAM: a compressible part (text)
and a random part. Then two stored snapshots of it, taken back to back: one raw, one
compressed by its background job (zstd level 1, no delay; the bench waits for the job).
For each: the stored machine-state size, and the median over --runs of forking it into a
running copy (wall time of the call, and the fork's own `restore_to_agent` phase, which
includes loading, and for the compressed one decompressing, the state).

    .venv/bin/python -m bench.snapshot_compression_bench [--memory 512M] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import time

from bench.common import scratch_manager
from torpor.codec import Codec
from torpor.instances.info import CompressionState
from torpor.instances.metadata import CompressionPolicy
from torpor.manager import InstanceManager
from torpor.units import format_size, parse_size

FILL = ("yes 'torpor stores snapshots of idle guests' | dd of=/dev/shm/text bs=1M count=96"
        " iflag=fullblock 2>/dev/null; dd if=/dev/urandom of=/dev/shm/random bs=1M count=32"
        " 2>/dev/null; sync")


async def fork_times(mgr: InstanceManager, snapshot_id: str, runs: int
                     ) -> tuple[float, float]:
    """Median wall time of a fork to running, and of its restore_to_agent phase."""
    walls, phases = [], []
    for i in range(runs):
        name = f"cfork-{snapshot_id[:4]}-{i}"
        start = time.monotonic()
        info = (await mgr.snapshot_fork(snapshot_id, name))[0]
        walls.append(time.monotonic() - start)
        assert info.last_operation is not None
        phases.append(info.last_operation.phases["restore_to_agent"])
        await mgr.delete(name, force=True)
    return statistics.median(walls), statistics.median(phases)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="512M")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    workdir, mgr = scratch_manager("tp-snapzbench-")
    try:
        await mgr.create("src", memory_bytes=parse_size(args.memory, "M"))
        await mgr.start("src")
        result = await mgr.exec("src", ["sh", "-c", FILL], timeout=300)
        assert result.exit_code == 0, result.stderr
        raw = await mgr.snapshot_create("src", "raw", compression=CompressionPolicy())
        packed = await mgr.snapshot_create("src", "zstd", compression=CompressionPolicy(
            codec=Codec.ZSTD, mode="background"))
        while mgr.snapshot_get(packed.id).compression.state is not CompressionState.COMPRESSED:
            await asyncio.sleep(0.2)
        await mgr.stop("src", force=True)
        rows = []
        for label, snap_id in (("raw", raw.id), ("zstd-1 (job)", packed.id)):
            shown = mgr.snapshot_get(snap_id)
            wall, to_agent = await fork_times(mgr, snap_id, args.runs)
            rows.append((label, shown.state_bytes or 0, wall, to_agent))
        print(f"\nstored snapshot of a {args.memory} guest (96 MiB text + 32 MiB random in RAM),"
              f" fork to running, median of {args.runs}\n")
        print(f"{'state':14} {'stored':>10} {'fork wall':>10} {'restore_to_agent':>17}")
        for label, size, wall, to_agent in rows:
            print(f"{label:14} {format_size(size):>10} {wall:9.2f}s {to_agent:16.3f}s")
        (_, raw_size, raw_wall, raw_agent), (_, z_size, z_wall, z_agent) = rows
        print(f"\nzstd/raw: stored {z_size / raw_size:.2f}x, fork wall {z_wall / raw_wall:.2f}x,"
              f" restore_to_agent {z_agent / raw_agent:.2f}x")
    finally:
        for name in await mgr.list_all():
            await mgr.delete(name.name, force=True)
        for snap in mgr.snapshot_list():
            await mgr.snapshot_delete(snap.id)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
