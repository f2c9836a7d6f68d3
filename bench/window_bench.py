"""Memory-file standby's paused window, and its phases (issue #22: at most 10 ms).

For each RAM size, one idle memory-file guest goes through --runs standby/restore cycles;
printed: the median of each standby phase, in ms. The window is pause → the state is safe
and the VM can no longer run (QEMU sent SIGKILL); `exit` (QEMU unmapping its RAM),
`flush-memory`, `drop-cache` and `persist` come after it.

    .venv/bin/python -m bench.window_bench [--sizes 512M,4G] [--runs 15]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

from bench.common import remove_work, scratch_manager
from torpor.instances.metadata import CompressionPolicy
from torpor.units import parse_size

PHASES = ("paused_window", "save", "kill", "exit", "flush-memory", "drop-cache", "persist")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512M,4G")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    work, mgr = scratch_manager("torpor-window-")
    print(f"{'guest':8}" + "".join(f"{p:>14}" for p in PHASES) + "   (medians, ms)")
    try:
        for size in args.sizes.split(","):
            name = f"w{size.lower()}"
            await mgr.create(name, memory_bytes=parse_size(size), memory_backing="file")
            await mgr.start(name)
            samples = []
            for _ in range(args.runs):
                info = await mgr.standby(name, CompressionPolicy())
                assert info.last_operation is not None
                samples.append(info.last_operation.phases)
                await mgr.restore(name)
            await mgr.delete(name, force=True)
            print(f"{size:8}" + "".join(
                f"{statistics.median(s.get(p, 0.0) for s in samples) * 1000:14.1f}"
                for p in PHASES), flush=True)
    finally:
        remove_work(work)


if __name__ == "__main__":
    asyncio.run(main())
