"""Snapshots in S3 (issue: snapshots in object storage), against a real S3 server
(SeaweedFS on 127.0.0.1, started here) in the same run:

1. Throughput: a running 2 GiB guest with half its RAM filled with random data is
   snapshotted; `torpor snapshot push` of it against boto3's own `upload_file` of the
   same payload files (whole files, holes read as zeros), then `snapshot pull` into a
   second data root against `download_file` of those objects.
2. Sharing: a 512 MiB half-filled guest in standby is forked 4 times; each running fork
   is snapshotted and pushed to one prefix: the bytes the four pushes upload against
   what the first one alone uploads (the bar: <= 1.5x).

    .venv/bin/python -m bench.fleet_bench [--size 2G] [--fork-size 512M] [--forks 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from tests.s3_helpers import S3Server, seaweedfs

from bench.common import fill_half, remove_work, scratch_manager
from torpor.manager import InstanceManager
from torpor.remote.transfer import iter_files
from torpor.units import format_size, parse_size

BUCKET = "bench-fleet"


def row(label: str, seconds: float, moved: int, logical: int) -> str:
    return (f"{label:34} {seconds:8.2f} s  {format_size(moved):>11}  "
            f"{format_size(logical / seconds):>11}/s")


def boto3_baseline(server: S3Server, payload: Path, into: Path) -> tuple[float, float, int]:
    """upload_file then download_file of every payload file: (up s, down s, bytes)."""
    client = server.client()
    files = list(iter_files(payload))
    total = sum(f.stat().st_size for f in files)
    started = time.monotonic()
    for f in files:
        client.upload_file(str(f), BUCKET, f"plain/{f.relative_to(payload)}")
    up = time.monotonic() - started
    started = time.monotonic()
    for f in files:
        target = into / f.relative_to(payload)
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, f"plain/{f.relative_to(payload)}", str(target))
    return up, time.monotonic() - started, total


async def throughput(mgr: InstanceManager, work: Path, server: S3Server, size: int) -> None:
    name = "fleet"
    await mgr.create(name, memory_bytes=size)
    await mgr.start(name)
    await fill_half(mgr, name, size)
    snap = await mgr.snapshot_create(name, "half")
    await mgr.stop(name, force=True)
    payload = mgr.data_root.snapshot(snap.id).payload
    logical = sum(f.stat().st_size for f in iter_files(payload))
    data = sum(f.stat().st_blocks * 512 for f in iter_files(payload))
    print(f"\n{format_size(size)} half-filled guest, running snapshot: {format_size(logical)}"
          f" in files, {format_size(data)} of it allocated")

    started = time.monotonic()
    report = await mgr.snapshot_push("half", f"s3://{BUCKET}/t", source=name)
    push_s = time.monotonic() - started
    other = InstanceManager(work / "data-b", mgr.settings)
    started = time.monotonic()
    await other.snapshot_pull(f"s3://{BUCKET}/t/half")
    pull_s = time.monotonic() - started
    up_s, down_s, total = await asyncio.to_thread(boto3_baseline, server, payload,
                                                  work / "plain")
    print(f"{'':34} {'time':>10}  {'sent/got':>11}  {'snapshot/s':>13}")
    print(row("torpor snapshot push", push_s, report.uploaded_bytes, logical))
    print(row("boto3 upload_file (same files)", up_s, total, logical))
    print(row("torpor snapshot pull", pull_s, report.uploaded_bytes, logical))
    print(row("boto3 download_file (same files)", down_s, total, logical))
    print(f"push {up_s / push_s:.2f}x as fast as upload_file; pull {down_s / pull_s:.2f}x as"
          f" fast as download_file; push sent {report.uploaded_bytes / total:.2f} of the bytes")


async def sharing(mgr: InstanceManager, server: S3Server, size: int, forks: int) -> None:
    base = "fbase"
    await mgr.create(base, memory_bytes=size)
    await mgr.start(base)
    await fill_half(mgr, base, size)
    await mgr.standby(base)
    infos = await mgr.fork(base, "ff", count=forks)
    uploaded: list[int] = []
    for info in infos:
        await mgr.snapshot_create(info.name, "s")
        report = await mgr.snapshot_push("s", f"s3://{BUCKET}/forks", source=info.name,
                                         remote_name=info.name)
        uploaded.append(report.uploaded_bytes)
    print(f"\n{forks} running forks of one standby {format_size(size)} half-filled guest,"
          " each snapshotted and pushed to one prefix:")
    for info, sent in zip(infos, uploaded, strict=True):
        print(f"  {info.name:8} uploaded {format_size(sent):>11}")
    print(f"  all {forks}: {format_size(sum(uploaded))} = {sum(uploaded) / uploaded[0]:.2f}x"
          " the first one's (bar <= 1.5x)")


async def main_async(args: argparse.Namespace) -> None:
    work, mgr = scratch_manager("torpor-fleet-")
    try:
        with tempfile.TemporaryDirectory(prefix="tp-s3-") as tmp, seaweedfs(Path(tmp)) as server:
            os.environ.update(server.env())
            server.client().create_bucket(Bucket=BUCKET)
            await throughput(mgr, work, server, parse_size(args.size))
            await sharing(mgr, server, parse_size(args.fork_size), args.forks)
    finally:
        remove_work(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--fork-size", default="512M")
    parser.add_argument("--forks", type=int, default=4)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
