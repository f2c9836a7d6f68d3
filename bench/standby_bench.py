"""Standby/restore benchmark (issue: standby and restore).

For each guest (512 MiB, 2 GiB, 4 GiB; idle, and with half its RAM filled with random
data in guest tmpfs) it measures, on the same running guest in the same run:

  torpor none / zstd-1 / lz4   torpor standby + restore (compressed while saved)
  torpor zstd bg               raw save, compressed afterwards by the background job
                               (restore is measured once the job has finished)
  exec:cat                     the recipe another VM manager uses: `stop`, `migrate` to
                               "exec:cat > file" with QEMU's default migration settings,
                               `quit`; restore with -incoming "exec:cat < file"

  virsh save           libvirt: the same guest defined as a libvirt domain (same kernel,
                       initrd, cmdline, CPU model, memory, a copy of its disk), `virsh save`
                       and `virsh restore`; libvirt is installed and started if missing

Columns: paused window (pause → QEMU exited), standby total, restore to agent-responsive,
state size; ratios against both baselines.

    .venv/bin/python -m bench.standby_bench [--sizes 512M,2G,4G] [--kinds idle,half] [--no-libvirt]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.libvirt_baseline import LibvirtGuest, ensure_libvirt
from torpor.codec import Codec
from torpor.errors import NotFound
from torpor.guest.agent import GuestAgent
from torpor.hypervisor.process import launch
from torpor.hypervisor.qmp import Monitor
from torpor.instances import InstanceManager
from torpor.instances.context import Settings
from torpor.instances.lifecycle import effective_accel
from torpor.instances.metadata import CompressionPolicy, utc_now
from torpor.instances.runtime import RuntimeRecord, clear_runtime, load_runtime, save_runtime
from torpor.instances.vmspec import vm_config_for
from torpor.units import format_size, parse_size

MODES = [("torpor none", CompressionPolicy()),
         ("torpor zstd-1", CompressionPolicy(codec=Codec.ZSTD)),
         ("torpor zstd bg", CompressionPolicy(codec=Codec.ZSTD, mode="background")),
         ("torpor lz4", CompressionPolicy(codec=Codec.LZ4))]


async def fill_half(mgr: InstanceManager, name: str, mem: int) -> None:
    mib = mem // 2 >> 20
    await mgr.exec(name, ["sh", "-c", f"dd if=/dev/urandom of=/tmp/fill bs=1M count={mib}"
                                      " 2>/dev/null"], timeout=600)


async def torpor_cycle(mgr: InstanceManager, name: str,
                       policy: CompressionPolicy) -> dict[str, float]:
    t0 = time.monotonic()
    info = await mgr.standby(name, policy)
    standby_total = time.monotonic() - t0
    assert info.last_operation is not None
    phases = info.last_operation.phases
    while (await mgr.get(name)).compression.state in ("pending", "compressing"):
        await asyncio.sleep(0.05)  # background: restore reads what the job produced
    size = sum(f.stat().st_size for f in mgr.paths(name).standby_dir.glob("machine-state*"))
    restored = await mgr.restore(name)
    assert restored.last_operation is not None
    return {"paused": phases["paused_window"], "standby": standby_total,
            "restore": restored.last_operation.phases["restore_to_agent"], "size": size}


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


async def libvirt_twin(mgr: InstanceManager, name: str, workdir: Path) -> LibvirtGuest:
    """The same guest (kernel, initrd, cmdline, CPU, memory, a copy of the fresh disk)."""
    async with mgr.locked(name) as ctx:
        config = vm_config_for(ctx.meta, ctx.paths, effective_accel(ctx))
        return LibvirtGuest(f"torpor-bench-{name}", config, ctx.paths.disk, workdir)


async def bench_guest(mgr: InstanceManager, mem: int, kind: str, workdir: Path,
                      runs: int, with_libvirt: bool) -> list[tuple[str, dict[str, float]]]:
    name = f"b{mem >> 20}-{kind}"
    await mgr.create(name, memory_bytes=mem)
    twin = await libvirt_twin(mgr, name, workdir) if with_libvirt else None
    rows = []
    try:
        await mgr.start(name)
        if kind == "half":
            await fill_half(mgr, name, mem)
        for label, policy in MODES:
            samples = [await torpor_cycle(mgr, name, policy) for _ in range(runs)]
            rows.append((label, median_of(samples)))
        samples = [await exec_cat_cycle(mgr, name, workdir) for _ in range(runs)]
        rows.append(("exec:cat", median_of(samples)))
        await mgr.delete(name, force=True)  # one guest at a time on this host
        if twin is not None:
            await twin.start()
            if kind == "half":
                await twin.exec(f"dd if=/dev/urandom of=/tmp/fill bs=1M count={mem // 2 >> 20}"
                                " 2>/dev/null")
            samples = [await twin.save_restore() for _ in range(runs)]
            rows.append(("virsh save", median_of(samples)))
        return rows
    finally:
        if twin is not None:
            twin.destroy()
        with contextlib.suppress(NotFound):
            await mgr.delete(name, force=True)


def median_of(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def print_table(results: list[tuple[str, list[tuple[str, dict[str, float]]]]]) -> None:
    head = (f"{'guest':10} {'method':14} {'paused s':>9} {'standby s':>10} {'restore s':>10}"
            f" {'state':>10} {'paused/cat':>10} {'paused/virsh':>12} {'restore: cat/x':>14}"
            f" {'virsh/x':>8}")
    print(head)
    print("-" * len(head))
    for guest, rows in results:
        by_label = dict(rows)
        cat, virsh = by_label["exec:cat"], by_label.get("virsh save")
        for label, m in rows:
            vs_virsh_p = f"{m['paused'] / virsh['paused']:11.2f}x" if virsh else f"{'-':>12}"
            vs_virsh_r = f"{virsh['restore'] / m['restore']:7.2f}x" if virsh else f"{'-':>8}"
            print(f"{guest:10} {label:14} {m['paused']:9.3f} {m['standby']:10.3f} "
                  f"{m['restore']:10.3f} {format_size(m['size']):>10} "
                  f"{m['paused'] / cat['paused']:9.2f}x {vs_virsh_p} "
                  f"{cat['restore'] / m['restore']:13.2f}x {vs_virsh_r}")
    print("\npaused = pause → QEMU exited (virsh: the whole `virsh save`); restore = restore call"
          " → guest agent answers;\nmedians of --runs. paused/X: fraction of the baseline's"
          " paused window (lower is better);\nrestore X/x: how many times faster than the"
          " baseline's restore (higher is better).")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512M,2G,4G")
    parser.add_argument("--kinds", default="idle,half")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-libvirt", action="store_true", help="skip the virsh baseline")
    args = parser.parse_args()
    if not args.no_libvirt:
        ensure_libvirt()
    workdir = Path(tempfile.mkdtemp(prefix="tp-bench-", dir="/var/tmp"))
    mgr = InstanceManager(workdir / "data", Settings(accel=os.environ.get(  # type: ignore[arg-type]
        "TORPOR_ACCEL", "auto")))
    results = []
    for size in args.sizes.split(","):
        for kind in args.kinds.split(","):
            mem = parse_size(size, "M")
            print(f"benchmarking {size} {kind} ...", file=sys.stderr)
            results.append((f"{size} {kind}", await bench_guest(
                mgr, mem, kind, workdir, args.runs, not args.no_libvirt)))
    print_table(results)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
