"""Fork benchmark for memory-file mode (issue: memory-file mode).

A 512 MiB guest with file-backed RAM is booted, put into standby, and then, in the same
run: one restore of it (to agent-responsive), and a fork of the standby guest into 4
running copies (each restored, with its own identity, agent answering). Then the host
memory of the 4 idle forks (PSS of their QEMU processes, which share the snapshot's RAM
file in the page cache) against one idle guest with anonymous RAM.

    .venv/bin/python -m bench.fork_bench [--runs 3] [--count 4]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import time
from pathlib import Path

from bench.common import scratch_manager
from torpor.manager import InstanceManager
from torpor.units import format_size


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages count 1/n towards each of n sharers."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss for {pid}")


async def settle(mgr: InstanceManager, names: list[str]) -> int:
    """Total PSS of the instances' QEMU processes once they have idled a moment."""
    await asyncio.sleep(2)
    total = 0
    for name in names:
        pid = (await mgr.get(name)).pid
        assert pid is not None
        total += pss_bytes(pid)
    return total


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=4)
    args = parser.parse_args()
    workdir, mgr = scratch_manager("tp-forkbench-")
    try:
        await mgr.create("src", memory_backing="file")
        await mgr.create("anon")
        await mgr.start("src")
        await mgr.standby("src")
        restores, forks = [], []
        for _ in range(args.runs):
            info = await mgr.restore("src")
            assert info.last_operation is not None
            restores.append(info.last_operation.phases["restore_to_agent"])
            await mgr.standby("src")
            start = time.monotonic()
            made = await mgr.fork("src", "fork", count=args.count)
            forks.append(time.monotonic() - start)
            names = [f.name for f in made]
            if len(forks) == args.runs:
                fork_pss = await settle(mgr, names)
            for name in names:
                await mgr.delete(name, force=True)
        await mgr.start("anon")
        one_pss = await settle(mgr, ["anon"])
    finally:
        for info in await mgr.list_all():
            await mgr.delete(info.name, force=True)
        shutil.rmtree(workdir, ignore_errors=True)
    restore, fork = statistics.median(restores), statistics.median(forks)
    print(f"{'what':44} {'median s':>9}  runs")
    print(f"{'one restore of the standby guest (to agent)':44} {restore:9.3f}  "
          + " ".join(f"{r:.3f}" for r in restores))
    print(f"{f'fork standby guest into {args.count} running copies':44} {fork:9.3f}  "
          + " ".join(f"{f:.3f}" for f in forks))
    print(f"ratio fork/restore: {fork / restore:.2f}x")
    print(f"\nPSS of {args.count} idle forks: {format_size(fork_pss)}; one idle guest "
          f"(anonymous RAM): {format_size(one_pss)}; ratio {fork_pss / one_pss:.2f}x "
          f"(vs {args.count}x if nothing were shared)")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
