"""Codec strategy benchmark (issue: standby and restore, compression).

On one real guest (default 2 GiB, half its RAM random; `--fill 0` for idle) it measures, in
the same run, the ways the machine state can be compressed while QEMU writes it and fed
back while QEMU loads it:

  save  in-process   QEMU → pipe → zstandard/lz4 bindings in a thread (+ xxh3 of the output)
        native       torpor's save leg: QEMU → pipe → `zstd -1 -T1` / `lz4 -1` → file,
                     then the xxh3 pass torpor does after QEMU has stopped
  load  in-process   file → thread (xxh3 + bindings decompress) → pipe → QEMU
        native       torpor's load leg: file → `zstd -dc` / `lz4 -dc` → pipe → QEMU, xxh3
                     thread alongside
        tmpfs        decompress to /dev/shm first, then QEMU reads that file (fd:)
  raw               the uncompressed file through fd: (reference)

Times are for the save leg (pause excluded) and the load leg (migrate-incoming → completed).
The in-process variants live only here, to keep the comparison reproducible; they need
the bench extra (`pip install -e '.[bench]'`: zstandard, lz4).

    .venv/bin/python -m bench.codec_bench [--memory 2G] [--fill 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lz4.frame
import xxhash
import zstandard

from torpor.codec import Codec, checksum_file
from torpor.hypervisor.qmp import Monitor
from torpor.hypervisor.vmconfig import DEFERRED, VMConfig
from torpor.instances.context import InstanceContext, Settings
from torpor.instances.runtime import load_runtime
from torpor.instances.states import Action
from torpor.machinestate.manifest import StateFile
from torpor.machinestate.stream import (
    FD_NAME,
    _pipe,
    load_state,
    prepare_outgoing,
    save_state,
    wait_migration,
)
from torpor.manager import InstanceManager
from torpor.operations.lifecycle import spawn_qemu, terminate
from torpor.units import format_size, parse_size

NATIVE_DECOMPRESS = {Codec.ZSTD: ["zstd", "-dcq"], Codec.LZ4: ["lz4", "-dcq"]}
SUFFIX = {Codec.ZSTD: ".zst", Codec.LZ4: ".lz4"}
CHUNK = 1 << 20


def _compress_pipe_to_file(read_end: int, out: Path, codec: Codec) -> None:
    """The in-process alternative: bindings in a thread, hashing what they write."""
    hasher = xxhash.xxh3_128()
    comp: Any = (zstandard.ZstdCompressor(level=1, threads=1).compressobj()
                 if codec is Codec.ZSTD else lz4.frame.LZ4FrameCompressor())
    with open(out, "xb") as f:
        head = comp.begin() if codec is Codec.LZ4 else b""
        while chunk := os.read(read_end, CHUNK):
            data = head + comp.compress(chunk)
            head = b""
            f.write(data)
            hasher.update(data)
        tail = comp.flush()
        f.write(tail)
        hasher.update(tail)
        os.fsync(f.fileno())
    os.close(read_end)


def _decompress_file_to_pipe(src: Path, write_end: int, codec: Codec) -> None:
    hasher = xxhash.xxh3_128()
    dec: Any = (zstandard.ZstdDecompressor().decompressobj() if codec is Codec.ZSTD
                else lz4.frame.LZ4FrameDecompressor())
    with open(src, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            data = dec.decompress(chunk)
            view = memoryview(data)
            while view:
                view = view[os.write(write_end, view):]
    os.close(write_end)


async def save_inprocess(mon: Monitor, out: Path, codec: Codec) -> None:
    read_end, write_end = _pipe()
    worker = asyncio.create_task(asyncio.to_thread(_compress_pipe_to_file, read_end, out, codec))
    await mon.hand_over_fd(FD_NAME, write_end)
    await mon.execute("migrate", {"uri": f"fd:{FD_NAME}"})
    await wait_migration(mon)
    await worker


async def load_inprocess(mon: Monitor, src: Path, codec: Codec) -> None:
    read_end, write_end = _pipe()
    worker = asyncio.create_task(asyncio.to_thread(_decompress_file_to_pipe, src, write_end,
                                                   codec))
    await mon.hand_over_fd(FD_NAME, read_end)
    await mon.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
    await wait_migration(mon)
    await worker


async def load_tmpfs(mon: Monitor, src: Path, codec: Codec) -> None:
    staged = Path("/dev/shm") / f"torpor-bench-{os.getpid()}"
    verifier = asyncio.create_task(asyncio.to_thread(checksum_file, src))
    with open(staged, "wb") as out:
        await asyncio.to_thread(subprocess.run, [*NATIVE_DECOMPRESS[codec], str(src)],
                                stdout=out, check=True)
    try:
        with open(staged, "rb") as f:
            await mon.send_fd(FD_NAME, f.fileno())
            await mon.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
            await wait_migration(mon)
        await verifier
    finally:
        staged.unlink()


async def timed_save(ctx: InstanceContext, out: Path, codec: Codec, native: bool) -> float:
    """Save the running guest's state, then resume it (the guest keeps running)."""
    record = load_runtime(ctx.paths)
    assert record is not None
    async with Monitor.connect(ctx.paths.qmp_socket) as mon:
        # The same stream for every codec: all pages (the zero-page filter is left out).
        await prepare_outgoing(mon, record.vm_config)
        await mon.pause()
        start = time.perf_counter()
        if native:  # the product's save leg, plus the hash it does after QEMU stops
            tmp = Path(tempfile.mkdtemp(dir=out.parent))
            await save_state(mon, tmp, codec, 1 if codec is Codec.ZSTD else 0)
            (tmp / StateFile(codec=codec).stored_name()).rename(out)
            tmp.rmdir()
            await asyncio.to_thread(checksum_file, out)
        else:
            await save_inprocess(mon, out, codec)
        elapsed = time.perf_counter() - start
        await mon.resume()
    return elapsed


async def timed_load(ctx: InstanceContext, config: VMConfig, src: Path, codec: Codec,
                     how: str) -> float:
    process = spawn_qemu(ctx, config, incoming=DEFERRED)
    try:
        async with Monitor.connect(ctx.paths.qmp_socket) as mon:
            start = time.perf_counter()
            if how == "native":  # the product's load leg, checksum verified concurrently
                expected = StateFile(codec=codec, checksum=checksum_file(src).checksum)
                start = time.perf_counter()
                await load_state(mon, src, codec, expected)
            elif how == "in-process":
                await load_inprocess(mon, src, codec)
            else:
                await load_tmpfs(mon, src, codec)
            return time.perf_counter() - start
    finally:
        await terminate(ctx, process)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--fill", type=int, default=1024, help="MiB of random guest RAM")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tp-codec-", dir="/var/tmp"))
    mgr = InstanceManager(work / "data", Settings(accel="tcg"))
    await mgr.create("codec", memory_bytes=parse_size(args.memory, "M"))
    await mgr.start("codec")
    if args.fill:
        await mgr.exec("codec", ["sh", "-c", f"dd if=/dev/urandom of=/tmp/f bs=1M "
                                             f"count={args.fill} 2>/dev/null"], timeout=900)
    rows: list[tuple[str, float, int]] = []
    files: dict[tuple[Codec, bool], Path] = {}
    async with mgr.registry.locked("codec", Action.CONFIGURE) as ctx:
        for codec in (Codec.ZSTD, Codec.LZ4):
            for native in (False, True):
                times = []
                for run in range(args.runs):
                    out = work / f"state-{codec}-{native}-{run}{SUFFIX[codec]}"
                    times.append(await timed_save(ctx, out, codec, native))
                    files[(codec, native)] = out
                label = f"save {codec} {'native' if native else 'in-process'}"
                rows.append((label, statistics.median(times), out.stat().st_size))
        # Loads need a guest that is not running: stop the saved one's QEMU first.
        record = load_runtime(ctx.paths)
        assert record is not None
        await terminate(ctx, record.process())
        config = record.vm_config
        for codec in (Codec.ZSTD, Codec.LZ4):
            src = files[(codec, False)]
            for how in ("in-process", "native", "tmpfs"):
                times = [await timed_load(ctx, config, src, codec, how) for _ in range(args.runs)]
                rows.append((f"load {codec} {how}", statistics.median(times),
                             src.stat().st_size))
        raw = work / "state.raw"
        with open(raw, "wb") as out_f:
            subprocess.run([*NATIVE_DECOMPRESS[Codec.ZSTD], str(files[(Codec.ZSTD, False)])],
                           stdout=out_f, check=True)
        times = [await timed_load(ctx, config, raw, Codec.NONE, "native")
                 for _ in range(args.runs)]
        rows.append(("load raw (fd:)", statistics.median(times), raw.stat().st_size))
    await mgr.delete("codec", force=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nguest {args.memory}, {args.fill} MiB random in RAM; medians of {args.runs} runs")
    print(f"{'strategy':28} {'median s':>9} {'file':>10}")
    for label, seconds, size in rows:
        print(f"{label:28} {seconds:9.3f} {format_size(size):>10}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
