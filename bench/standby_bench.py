"""Standby/restore benchmark (issue: standby and restore).

For each guest (512 MiB, 2 GiB, 4 GiB; idle, and with half its RAM filled with random
data in guest tmpfs) it measures, on the same running guest in the same run:

  torpor none / zstd-1 / lz4   torpor standby + restore (compressed while saved)
  torpor auto                  zstd frames, chunks a probe finds incompressible stored raw
  torpor zstd bg               raw save, compressed afterwards by the background job
                               (restore is measured once the job has finished)
  torpor file                  memory-file mode: the same guest created with
                               --memory-backing file; the save is device state only, the
                               RAM file is flushed and dropped from the page cache after
                               QEMU has quit (counted in standby total); restore maps it
  exec:cat                     the recipe another VM manager uses: `stop`, `migrate` to
                               "exec:cat > file" with QEMU's default migration settings,
                               `quit`; restore with -incoming "exec:cat < file", QEMU
                               started plainly (same argv, `-daemonize`), without
                               torpor's launcher (fd table sized at exec, setsid start)

  virsh save           libvirt: the same guest defined as a libvirt domain (same kernel,
                       initrd, cmdline, CPU model, memory, a copy of its disk), `virsh save`
                       and `virsh restore`; libvirt is installed and started if missing

torpor's anonymous-RAM methods and exec:cat take turns on the guest, in a random order each run.
Before every restore, of every method, the host memory it will allocate is warmed up
(touched and freed; `--host-memory as-is` skips that): on a VM host that hands free memory
back to its hypervisor, whether a restore gets memory the hypervisor still backs decides
more than the method does (bench/hostmem.py).
Columns: paused window (pause → QEMU exited), standby total, restore to running (QEMU
resumed), restore to agent-responsive, time for the guest to read back its data after
restore (half guests), host page cache the standby left resident (the RAM file in file
mode), state size; ratios against both baselines. A last table: guest memory-write
throughput with anonymous vs file-backed RAM (the cost of file mode while running).

    .venv/bin/python -m bench.standby_bench [--sizes 512M,2G,4G] [--kinds idle,half]
        [--runs N] [--host-memory warm|as-is] [--no-libvirt] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.common import fill_half, scratch_manager
from bench.hostmem import reports_free_pages, warm_up
from bench.libvirt_baseline import LibvirtGuest, libvirt_running
from torpor.codec import Codec
from torpor.errors import NotFound
from torpor.guest.agent import GuestAgent
from torpor.hypervisor.process import ProcessIdentity, TrackedProcess, prepare_endpoints
from torpor.hypervisor.qmp import Monitor
from torpor.hypervisor.vmconfig import VMConfig, render_argv
from torpor.instances.metadata import CompressionPolicy, utc_now
from torpor.instances.runtime import RuntimeRecord, clear_runtime, load_runtime, save_runtime
from torpor.instances.states import Action
from torpor.instances.vmspec import vm_config_for
from torpor.manager import InstanceManager
from torpor.operations.lifecycle import effective_accel
from torpor.units import format_size, parse_size

MODES = [("torpor none", CompressionPolicy()),
         ("torpor zstd-1", CompressionPolicy(codec=Codec.ZSTD)),
         ("torpor zstd bg", CompressionPolicy(codec=Codec.ZSTD, mode="background")),
         ("torpor lz4", CompressionPolicy(codec=Codec.LZ4)),
         ("torpor auto", CompressionPolicy(codec=Codec.ZSTD, store_incompressible=True))]


def resident_bytes(path: Path) -> int:
    """Page-cache bytes of a file (util-linux fincore); 0 if it does not exist."""
    if not path.exists():
        return 0
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip() or 0)


async def first_command(mgr: InstanceManager, name: str) -> float:
    """Seconds for the first guest command after a restore (`true`): a new connection to
    qemu-ga (on a socket port it answered ~100 ms late, after one of its reconnect
    sleeps: docs/design.md, "The first agent command"). Taken apart from `read_back` so
    that column times the memory, not the connection."""
    t0 = time.monotonic()
    await mgr.exec(name, ["true"])
    return time.monotonic() - t0


async def read_back(mgr: InstanceManager, name: str, kind: str) -> float:
    """Seconds for the guest to read the data it wrote before standby (lazy paging).
    `dd` into its own buffer: busybox `cat` into /dev/null uses sendfile, which hands
    /dev/null page references and never reads the data (the QEMU of a memory-file guest
    had mapped 11 MiB more of its RAM file after `cat` of 200 MiB, 207 MiB after md5sum)."""
    if kind != "half":
        return 0.0
    t0 = time.monotonic()
    await mgr.exec(name, ["sh", "-c", "dd if=/tmp/fill of=/dev/null bs=1M 2>/dev/null"],
                   timeout=600)
    return time.monotonic() - t0


Prepare = Callable[[int], None]  # run right before a measured restore, given its state bytes
WARM_UP_MARGIN = 128 << 20  # QEMU's own allocations, pipe and codec buffers


def prepare_host_memory(warm: bool) -> Prepare:
    """What runs before every restore, of every method: nothing, or a warm-up of the host
    memory the restore is about to allocate (bench/hostmem.py says why)."""
    if not warm:
        return lambda state_bytes: None
    return lambda state_bytes: warm_up(state_bytes + WARM_UP_MARGIN)


async def torpor_cycle(mgr: InstanceManager, name: str, kind: str,
                       policy: CompressionPolicy, prepare: Prepare) -> dict[str, float]:
    t0 = time.monotonic()
    info = await mgr.standby(name, policy)
    standby_total = time.monotonic() - t0
    assert info.last_operation is not None
    phases = info.last_operation.phases
    paths = mgr.paths(name)
    resident = resident_bytes(paths.memory_file)
    while (await mgr.get(name)).compression.state in ("pending", "compressing"):
        await asyncio.sleep(0.05)  # background: restore reads what the job produced
    size = sum(f.stat().st_size for f in paths.standby_dir.glob("machine-state*"))
    # file mode: the restore reads the RAM file's data back into the page cache
    ram_file = paths.memory_file.stat().st_blocks * 512 if paths.memory_file.exists() else 0
    await asyncio.to_thread(prepare, size + ram_file)
    restored = await mgr.restore(name)
    assert restored.last_operation is not None
    done = restored.last_operation.phases
    return {"paused": phases["paused_window"], "standby": standby_total,
            "running": done["restore_to_running"], "restore": done["restore_to_agent"],
            "first_cmd": await first_command(mgr, name),
            "readback": await read_back(mgr, name, kind), "resident": resident, "size": size}


def launch_plainly(config: VMConfig, pidfile: Path, log_file: Path,
                   extra_args: tuple[str, ...]) -> TrackedProcess:
    """QEMU as a VM manager without torpor's launcher starts it: the same argv, then
    `-daemonize`; returns once QEMU has initialised (the daemonizing parent exits)."""
    prepare_endpoints(config)
    argv = [*render_argv(config), *extra_args, "-daemonize", "-pidfile", str(pidfile)]
    with open(log_file, "ab") as log:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=True)
    identity = ProcessIdentity.of(int(pidfile.read_text().strip()))
    assert identity is not None, "the baseline's QEMU exited at once"
    return TrackedProcess(identity)


async def exec_cat_cycle(mgr: InstanceManager, name: str, workdir: Path, prepare: Prepare
                         ) -> dict[str, float]:
    """The baseline, driven through QMP on the same QEMU process torpor started."""
    state_file = workdir / f"{name}.state"
    async with mgr.registry.locked(name, Action.CONFIGURE) as ctx:
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
        await asyncio.to_thread(prepare, state_file.stat().st_size)
        t0 = time.monotonic()
        config = record.vm_config
        proc = launch_plainly(config, ctx.paths.pidfile, ctx.paths.qemu_log,
                              ("-incoming", f"exec:cat < {state_file}"))
        save_runtime(ctx.paths, RuntimeRecord(identity=proc.identity, vm_config=config,
                                              launched_at=utc_now()))
        # The stream carries the source's run state (paused), so the recipe ends in `cont`.
        async with Monitor.connect(ctx.paths.qmp_socket) as mon:
            while (status := await mon.status()) == "inmigrate":
                await asyncio.sleep(0.005)
            if status != "running":
                await mon.resume()
        running = time.monotonic() - t0
        await GuestAgent.wait_ready(ctx.paths.agent_pipe, 120)
        restore = time.monotonic() - t0
    size = state_file.stat().st_size
    state_file.unlink()
    return {"paused": paused, "standby": paused, "running": running, "restore": restore,
            "first_cmd": 0.0, "readback": 0.0, "resident": 0, "size": size}


async def libvirt_twin(mgr: InstanceManager, name: str, workdir: Path) -> LibvirtGuest:
    """The same guest (kernel, initrd, cmdline, CPU, memory, a copy of the fresh disk)."""
    async with mgr.registry.locked(name, Action.CONFIGURE) as ctx:
        config = vm_config_for(ctx.meta, ctx.paths, effective_accel(ctx))
        return LibvirtGuest(f"torpor-bench-{name}", config, ctx.paths.disk, workdir)


async def write_throughput(mgr: InstanceManager, name: str, mib: int) -> float:
    """MiB/s the guest writes fresh memory (tmpfs) at: first touch of each page."""
    t0 = time.monotonic()
    await mgr.exec(name, ["sh", "-c", f"dd if=/dev/zero of=/tmp/w bs=1M count={mib}"
                                      " 2>/dev/null; rm /tmp/w"], timeout=600)
    return mib / (time.monotonic() - t0)


async def bench_file_mode(mgr: InstanceManager, mem: int, kind: str, runs: int,
                          prepare: Prepare) -> tuple[dict[str, float], float]:
    """The memory-file rows: the same guest created with file-backed RAM."""
    name = f"f{mem >> 20}-{kind}"
    await mgr.create(name, memory_bytes=mem, memory_backing="file")
    try:
        await mgr.start(name)
        write_rate = await write_throughput(mgr, name, mem // 4 >> 20)
        if kind == "half":
            await fill_half(mgr, name, mem)
        samples = [await torpor_cycle(mgr, name, kind, CompressionPolicy(), prepare)
                   for _ in range(runs)]
        return median_of(samples), write_rate
    finally:
        with contextlib.suppress(NotFound):
            await mgr.delete(name, force=True)


SETTLE = 1.0  # s the guest idles before each standby/restore cycle
WRITE_RATES: dict[str, tuple[float, float]] = {}  # guest → (anonymous, file) MiB/s


async def bench_guest(mgr: InstanceManager, mem: int, kind: str, workdir: Path,
                      runs: int, with_libvirt: bool, prepare: Prepare, seed: int
                      ) -> list[tuple[str, dict[str, float]]]:
    name = f"b{mem >> 20}-{kind}"
    await mgr.create(name, memory_bytes=mem)
    twin = await libvirt_twin(mgr, name, workdir) if with_libvirt else None
    rows = []
    try:
        await mgr.start(name)
        anonymous_rate = await write_throughput(mgr, name, mem // 4 >> 20)
        if kind == "half":
            await fill_half(mgr, name, mem)
        # The methods take turns on the guest, so that each meets it in the same state (a
        # guest just booted is still busy for some seconds) and the same host noise, in a
        # new random order each round: a fixed order falls into step with the host's own
        # periodic work (on a VM host, free memory handed back to the hypervisor every
        # 2 s, which makes the next allocation of it slow) and biases one method.
        # Each cycle starts from a guest left idle for SETTLE seconds, not one still busy
        # with what the previous restore set off (exec:cat's network announcements).
        cycles: list[tuple[str, Callable[[], Awaitable[dict[str, float]]]]] = [
            *((label, functools.partial(torpor_cycle, mgr, name, kind, policy, prepare))
              for label, policy in MODES),
            ("exec:cat", functools.partial(exec_cat_cycle, mgr, name, workdir, prepare))]
        samples: dict[str, list[dict[str, float]]] = {label: [] for label, _ in cycles}
        order = random.Random(f"{seed} {mem} {kind}")  # --seed replays a run's orders
        for _ in range(runs):
            for label, cycle in order.sample(cycles, len(cycles)):
                await asyncio.sleep(SETTLE)
                samples[label].append(await cycle())
        pair_with_raw(samples, "torpor none")
        rows += [(label, median_of(samples[label])) for label, _ in cycles]
        await mgr.delete(name, force=True)  # one guest at a time on this host
        file_row, file_rate = await bench_file_mode(mgr, mem, kind, runs, prepare)
        rows.insert(len(MODES), ("torpor file", file_row))
        WRITE_RATES[f"{mem >> 20}M {kind}"] = (anonymous_rate, file_rate)
        if twin is not None:
            await twin.start()
            if kind == "half":
                await twin.exec(f"dd if=/dev/urandom of=/tmp/fill bs=1M count={mem // 2 >> 20}"
                                " 2>/dev/null")
            rows.append(("virsh save", median_of([await twin.save_restore(prepare)
                                                  for _ in range(runs)])))
        return rows
    finally:
        if twin is not None:
            twin.destroy()
        with contextlib.suppress(NotFound):
            await mgr.delete(name, force=True)


def pair_with_raw(samples: dict[str, list[dict[str, float]]], raw: str) -> None:
    """Each sample's paused window and restore to running as ratios to the raw method's
    in the same round: the host's slow drifts cancel out of a pair, so the median of the
    ratios says more than the ratio of the medians."""
    for runs in samples.values():
        for sample, baseline in zip(runs, samples[raw], strict=True):
            sample["paused/none"] = sample["paused"] / baseline["paused"]
            sample["running/none"] = sample["running"] / baseline["running"]


def median_of(samples: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


HEAD = (f"{'guest':10} {'method':14} {'paused s':>9} {'standby s':>10} {'running s':>10}"
        f" {'restore s':>10} {'1st cmd s':>10} {'readback s':>11} {'resident':>10} {'state':>10}"
        f" {'paused/cat':>10} {'paused/virsh':>12} {'restore: cat/x':>14} {'virsh/x':>8}"
        f" {'running: virsh/x':>16} {'paused/none':>11} {'running/none':>12}")


def print_rows(guest: str, rows: list[tuple[str, dict[str, float]]]) -> None:
    """One guest's rows, printed as soon as it is done (a long run keeps what it has)."""
    by_label = dict(rows)
    cat, virsh, raw = by_label["exec:cat"], by_label.get("virsh save"), by_label["torpor none"]
    for label, m in rows:
        vs_virsh_p = f"{m['paused'] / virsh['paused']:11.3f}x" if virsh else f"{'-':>12}"
        vs_virsh_r = f"{virsh['restore'] / m['restore']:7.2f}x" if virsh else f"{'-':>8}"
        vs_virsh_run = (f"{virsh['running'] / m['running']:15.2f}x" if virsh
                        else f"{'-':>16}")
        readback = f"{m['readback']:11.3f}" if m.get("readback") else f"{'-':>11}"
        first = f"{m['first_cmd']:10.3f}" if m.get("first_cmd") else f"{'-':>10}"
        print(f"{guest:10} {label:14} {m['paused']:9.3f} {m['standby']:10.3f} "
              f"{m['running']:10.3f} {m['restore']:10.3f} {first} {readback} "
              f"{format_size(m.get('resident', 0)):>10} {format_size(m['size']):>10} "
              f"{m['paused'] / cat['paused']:9.3f}x {vs_virsh_p} "
              f"{cat['restore'] / m['restore']:13.2f}x {vs_virsh_r} {vs_virsh_run}"
              f" {m.get('paused/none', m['paused'] / raw['paused']):10.2f}x"
              f" {m.get('running/none', m['running'] / raw['running']):11.2f}x",
              flush=True)


def print_footer() -> None:
    print("\npaused = pause → QEMU exited (virsh: the whole `virsh save`); running = restore"
          " call → guest resumed;\nrestore = restore call → guest agent answers; 1st cmd = the"
          " first guest command after it (`true`, a new agent connection);\nreadback ="
          " guest reads its half-RAM file after that;\nresident = page cache the standby"
          " left behind (file mode: the RAM file, after flush + drop);\nmedians of --runs."
          " paused/X: fraction of the baseline's paused window (lower is better);\nX/x: how"
          " many times faster than the baseline (higher is better);\nX/none: against torpor's own"
          " uncompressed standby (the compression and restore-pool bars): the median of each"
          " round's ratio\n(the same round's raw cycle), for file mode and virsh the ratio of"
          " the medians.")
    if WRITE_RATES:
        print(f"\n{'guest':12} {'anonymous MiB/s':>16} {'file MiB/s':>11} {'file/anon':>10}")
        for guest, (anon, file) in WRITE_RATES.items():
            print(f"{guest:12} {anon:16.0f} {file:11.0f} {file / anon:9.2f}x")
        print("guest writes a quarter of its RAM (dd to tmpfs) right after boot: first touch"
              " of fresh pages.")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512M,2G,4G")
    parser.add_argument("--kinds", default="idle,half")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-libvirt", action="store_true", help="skip the virsh baseline")
    parser.add_argument(
        "--host-memory", choices=("warm", "as-is"), default="warm",
        help="warm (default): before every restore, of every method, touch and free as much"
             " memory as it will allocate, so that none waits for a hypervisor to back"
             " memory again; as-is: restore at once, on whatever memory the host gives")
    parser.add_argument("--seed", type=int, default=None,
                        help="the rounds' orders (printed; a new one each run by default)")
    args = parser.parse_args()
    seed = random.randrange(1 << 32) if args.seed is None else args.seed
    prepare = prepare_host_memory(args.host_memory == "warm")
    print(f"round orders: --seed {seed}")
    print(f"host memory: {args.host_memory}; this host "
          f"{'hands' if reports_free_pages() else 'does not hand'} free memory back to a"
          " hypervisor (virtio-balloon free page reporting)", flush=True)
    with contextlib.ExitStack() as stack:
        if not args.no_libvirt:
            stack.enter_context(libvirt_running())
        workdir, mgr = scratch_manager("tp-bench-")
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        print(HEAD)
        print("-" * len(HEAD), flush=True)
        for size in args.sizes.split(","):
            for kind in args.kinds.split(","):
                mem = parse_size(size, "M")
                print(f"benchmarking {size} {kind} ...", file=sys.stderr)
                print_rows(f"{size} {kind}", await bench_guest(
                    mgr, mem, kind, workdir, args.runs, not args.no_libvirt, prepare, seed))
        print_footer()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
