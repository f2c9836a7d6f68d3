"""Standby/restore benchmark (issue: standby and restore).

For each guest (512 MiB, 2 GiB, 4 GiB; idle, and with half its RAM filled with random
data in guest tmpfs) it measures, on the same running guest in the same run:

  torpor none / zstd-1 / lz4   torpor standby + restore
  exec:cat                     the recipe another VM manager uses: `stop`, `migrate` to
                               "exec:cat > file" with QEMU's default migration settings,
                               `quit`; restore with -incoming "exec:cat < file"

Columns: paused window (pause → QEMU exited), standby total, restore to agent-responsive,
state size; ratios against exec:cat. Not yet included: the libvirt (virsh save/restore)
baseline.

    .venv/bin/python bench/standby_bench.py [--sizes 512M,2G,4G] [--kinds idle,half]
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

from torpor.codec import Codec
from torpor.guest.agent import GuestAgent
from torpor.hypervisor.process import launch
from torpor.hypervisor.qmp import Monitor
from torpor.instances import InstanceManager
from torpor.instances.context import Settings
from torpor.instances.metadata import CompressionPolicy, utc_now
from torpor.instances.runtime import RuntimeRecord, clear_runtime, load_runtime, save_runtime
from torpor.units import format_size, parse_size

MODES = [("torpor none", Codec.NONE), ("torpor zstd-1", Codec.ZSTD), ("torpor lz4", Codec.LZ4)]


async def fill_half(mgr: InstanceManager, name: str, mem: int) -> None:
    mib = mem // 2 >> 20
    await mgr.exec(name, ["sh", "-c", f"dd if=/dev/urandom of=/tmp/fill bs=1M count={mib}"
                                      " 2>/dev/null"], timeout=600)


async def torpor_cycle(mgr: InstanceManager, name: str, codec: Codec) -> dict[str, float]:
    t0 = time.monotonic()
    info = await mgr.standby(name, CompressionPolicy(codec=codec))
    standby_total = time.monotonic() - t0
    assert info.last_operation is not None
    phases = info.last_operation.phases
    size = sum(f.stat().st_size for f in mgr.paths(name).standby_dir.glob("machine-state*"))
    t0 = time.monotonic()
    await mgr.restore(name)
    return {"paused": phases["paused_window"], "standby": standby_total,
            "restore": time.monotonic() - t0, "size": size}


async def exec_cat_cycle(mgr: InstanceManager, name: str, workdir: Path) -> dict[str, float]:
    """The baseline, driven through QMP on the same QEMU process torpor started."""
    state_file = workdir / f"{name}.state"
    async with mgr.locked(name) as ctx:
        record = load_runtime(ctx.paths)
        assert record is not None
        process = record.process()
        t0 = time.monotonic()
        async with Monitor.connect(ctx.paths.qmp_socket) as mon:
            await mon.pause()
            await mon.execute("migrate", {"uri": f"exec:cat > {state_file}"})
            while (await mon.query_migrate()).get("status") not in ("completed", "failed"):
                await asyncio.sleep(0.005)
            await mon.quit()
        await asyncio.to_thread(process.wait_exit, 30)
        paused = time.monotonic() - t0
        clear_runtime(ctx.paths)
        t0 = time.monotonic()
        config = record.vm_config
        proc = launch(config, pidfile=ctx.paths.pidfile, log_file=ctx.paths.qemu_log,
                      extra_args=("-incoming", f"exec:cat < {state_file}"))
        save_runtime(ctx.paths, RuntimeRecord(identity=proc.identity, vm_config=config,
                                              launched_at=utc_now()))
        # The stream carries the source's run state (paused), so the recipe ends in `cont`.
        async with Monitor.connect(ctx.paths.qmp_socket) as mon:
            while (status := await mon.status()) == "inmigrate":
                await asyncio.sleep(0.005)
            if status != "running":
                await mon.resume()
        await GuestAgent.wait_ready(ctx.paths.agent_socket, 120)
        restore = time.monotonic() - t0
    size = state_file.stat().st_size
    state_file.unlink()
    return {"paused": paused, "standby": paused, "restore": restore, "size": size}


async def bench_guest(mgr: InstanceManager, mem: int, kind: str, workdir: Path,
                      runs: int) -> list[tuple[str, dict[str, float]]]:
    name = f"b{mem >> 20}-{kind}"
    await mgr.create(name, memory_bytes=mem)
    try:
        await mgr.start(name)
        if kind == "half":
            await fill_half(mgr, name, mem)
        rows = []
        for label, codec in MODES:
            samples = [await torpor_cycle(mgr, name, codec) for _ in range(runs)]
            rows.append((label, median_of(samples)))
        samples = [await exec_cat_cycle(mgr, name, workdir) for _ in range(runs)]
        rows.append(("exec:cat", median_of(samples)))
        return rows
    finally:
        await mgr.delete(name, force=True)


def median_of(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def print_table(results: list[tuple[str, list[tuple[str, dict[str, float]]]]]) -> None:
    head = (f"{'guest':14} {'method':14} {'paused s':>9} {'standby s':>10} {'restore s':>10}"
            f" {'state':>10} {'paused vs cat':>14} {'restore vs cat':>15}")
    print(head)
    print("-" * len(head))
    for guest, rows in results:
        base = dict(rows)["exec:cat"]
        for label, m in rows:
            print(f"{guest:14} {label:14} {m['paused']:9.3f} {m['standby']:10.3f} "
                  f"{m['restore']:10.3f} {format_size(m['size']):>10} "
                  f"{m['paused'] / base['paused']:13.2f}x {base['restore'] / m['restore']:13.2f}x"
                  " faster")
    print("\npaused = pause → QEMU exited; restore = QEMU start → guest agent answers;"
          " medians of --runs; 'vs cat' = ratio against the exec:cat recipe on the same guest")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512M,2G,4G")
    parser.add_argument("--kinds", default="idle,half")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tp-bench-", dir="/var/tmp"))
    mgr = InstanceManager(workdir / "data", Settings(accel=os.environ.get(  # type: ignore[arg-type]
        "TORPOR_ACCEL", "auto")))
    results = []
    for size in args.sizes.split(","):
        for kind in args.kinds.split(","):
            mem = parse_size(size, "M")
            print(f"benchmarking {size} {kind} ...", file=sys.stderr)
            results.append((f"{size} {kind}", await bench_guest(mgr, mem, kind, workdir,
                                                               args.runs)))
    print_table(results)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
