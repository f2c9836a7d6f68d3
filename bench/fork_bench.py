"""Fork benchmark for memory-file mode (issue: memory-file mode).

A 512 MiB guest with file-backed RAM is booted, put into standby, and then, in the same
run: one restore of it (to agent-responsive), a fork of the standby guest into 4
running copies (each restored, with its own identity, agent answering), and a second
fork ×4 while those run (a template forked in waves: it maps the fork base the first
made, kept while its forks live, instead of copying the source's RAM and disk). Then the host
memory of the 4 idle forks (PSS of their QEMU processes, which share the snapshot's RAM
file in the page cache) against one idle guest with anonymous RAM.

Both are timed as calls (wall time, what a user waits for), and the restore's own
`restore_to_agent` phase is shown too. The CPU columns are what the QEMU processes used
up to that point (their threads' run time, /proc/PID/task/*/schedstat) and torpor's own
(this process): on a host with fewer cores than forks, (CPU of the fork) / cores is a
floor under its wall time whatever torpor does.

    .venv/bin/python -m bench.fork_bench [--runs 3] [--count 4] [--dir /var/tmp] [--reflink]

`--dir`: where the scratch data root goes; a filesystem with reflink (XFS, btrfs) makes
the fork's base snapshot and copies clones instead of copies. `--reflink`: the data root
on an XFS filesystem with reflink made for the run (a loop device, under `--dir`), as a
host that forks would have it; `make bench-fork` runs both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench.common import pss_bytes, reflink_filesystem, scratch_manager
from torpor.manager import InstanceManager
from torpor.units import format_size

T = TypeVar("T")


def cpu_seconds(pid: int) -> float:
    """CPU time all of a process's threads have run (schedstat: ns, not clock ticks)."""
    tasks = Path(f"/proc/{pid}/task")
    return sum(int((task / "schedstat").read_text().split()[0])
               for task in tasks.iterdir()) / 1e9


async def qemu_pids(mgr: InstanceManager, names: list[str]) -> list[int]:
    pids = [(await mgr.get(name)).pid for name in names]
    assert None not in pids
    return [pid for pid in pids if pid is not None]


async def qemu_cpu(mgr: InstanceManager, names: list[str]) -> float:
    return sum(cpu_seconds(pid) for pid in await qemu_pids(mgr, names))


async def settle(mgr: InstanceManager, names: list[str]) -> int:
    """Total PSS of the instances' QEMU processes once they have idled a moment."""
    await asyncio.sleep(2)
    return sum(pss_bytes(pid) for pid in await qemu_pids(mgr, names))


@dataclass
class Sample:
    """One kind of call's runs: wall seconds, its QEMUs' CPU seconds, torpor's own."""

    wall: list[float] = field(default_factory=list)
    qemu_cpu: list[float] = field(default_factory=list)
    own_cpu: list[float] = field(default_factory=list)


async def timed(sample: Sample, call: Awaitable[T]) -> T:
    start, own = time.monotonic(), time.process_time()
    result = await call
    sample.wall.append(time.monotonic() - start)
    sample.own_cpu.append(time.process_time() - own)
    return result


def row(what: str, values: list[float]) -> str:
    return (f"{what:46} {statistics.median(values):9.3f}  "
            + " ".join(f"{v:.3f}" for v in values))


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--dir", default="/var/tmp", help="parent of the scratch data root")
    parser.add_argument("--reflink", action="store_true",
                        help="the data root on an XFS (reflink) loop filesystem made for the run")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        parent = (stack.enter_context(reflink_filesystem(args.dir, 8 << 30)) if args.reflink
                  else Path(args.dir))
        return await bench(args, parent)


async def bench(args: argparse.Namespace, parent: Path) -> int:
    workdir, mgr = scratch_manager("tp-forkbench-", str(parent))
    restore, fork, again, to_agent = Sample(), Sample(), Sample(), []
    try:
        await mgr.create("src", memory_backing="file")
        await mgr.create("anon")
        await mgr.start("src")
        await mgr.standby("src")
        for _ in range(args.runs):
            info = await timed(restore, mgr.restore("src"))
            assert info.last_operation is not None
            to_agent.append(info.last_operation.phases["restore_to_agent"])
            restore.qemu_cpu.append(await qemu_cpu(mgr, ["src"]))
            await mgr.standby("src")
            made = await timed(fork, mgr.fork("src", "fork", count=args.count))
            names = [f.name for f in made]
            fork.qemu_cpu.append(await qemu_cpu(mgr, names))
            if len(fork.wall) == args.runs:
                fork_pss = await settle(mgr, names)
            wave = await timed(again, mgr.fork("src", "wave", count=args.count))
            for name in names + [f.name for f in wave]:
                await mgr.delete(name, force=True)
        await mgr.start("anon")
        one_pss = await settle(mgr, ["anon"])
    finally:
        for info in await mgr.list_all():
            await mgr.delete(info.name, force=True)
        shutil.rmtree(workdir, ignore_errors=True)
    cores = os.cpu_count() or 1
    one, many = statistics.median(restore.wall), statistics.median(fork.wall)
    print(f"data root under {parent}"
          f"{' (XFS with reflink, on a loop device)' if args.reflink else ''}; {cores} cores\n")
    print(f"{'what':46} {'median s':>9}  runs")
    print(row("one restore of the standby guest (call)", restore.wall))
    print(row("  its restore_to_agent phase", to_agent))
    print(row(f"fork standby guest into {args.count} running copies (call)", fork.wall))
    print(row(f"  again, its first {args.count} forks running (kept base)", again.wall))
    print(row("CPU: the restored QEMU", restore.qemu_cpu))
    print(row("CPU: torpor, for the restore", restore.own_cpu))
    print(row(f"CPU: the {args.count} forks' QEMUs", fork.qemu_cpu))
    print(row("CPU: torpor, for the fork", fork.own_cpu))
    floor = [(q + o) / cores for q, o in zip(fork.qemu_cpu, fork.own_cpu, strict=True)]
    print(row(f"fork's CPU / {cores} cores (a floor on its wall time)", floor))
    print(f"\nratio fork/restore: {many / one:.2f}x (calls); "
          f"{many / statistics.median(to_agent):.2f}x against restore_to_agent; "
          f"the CPU floor alone is {statistics.median(floor) / one:.2f}x; "
          f"the second wave {statistics.median(again.wall) / one:.2f}x")
    print(f"\nPSS of {args.count} idle forks: {format_size(fork_pss)}; one idle guest "
          f"(anonymous RAM): {format_size(one_pss)}; ratio {fork_pss / one_pss:.2f}x "
          f"(vs {args.count}x if nothing were shared)")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
