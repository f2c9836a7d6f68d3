"""Copy benchmark (issue: copy engine).

Copies one sparse disk image (default 8 GiB apparent, 2 GiB of data in 64 MiB extents)
three ways and prints a table of median times, bytes written and ratios:

  reflink   torpor.copy on an XFS (reflink=1) loop filesystem
  sparse    torpor.copy on ext4 (the machine's disk): SEEK_DATA/SEEK_HOLE + copy_file_range
  cp        `cp --sparse=always` on ext4: the baseline

Each run starts with dirty pages written back and the page cache dropped, so every
method reads a cold source. Needs root (loop mount, drop_caches).

    .venv/bin/python bench/copy_bench.py [--size 8G] [--data 2G] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import reflink_filesystem
from torpor.copy import copy_file
from torpor.units import format_size, parse_size

EXTENT = 64 << 20


def make_image(path: Path, size: int, data: int) -> None:
    """`data` bytes of random data spread evenly over `size`, in EXTENT-sized extents."""
    count = max(1, data // EXTENT)
    stride = size // count
    with open(path, "wb") as f:
        f.truncate(size)
        block = os.urandom(EXTENT)
        for i in range(count):
            f.seek(i * stride)
            f.write(block[: min(EXTENT, size - i * stride)])
            block = block[1:] + block[:1]  # not identical extents (no dedup luck)
    os.sync()


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def timed(fn: Callable[[], None]) -> float:
    drop_caches()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(label: str, src: Path, dst: Path, runs: int, do_copy: Callable[[Path, Path], None]
            ) -> tuple[str, list[float], int]:
    times, written = [], 0
    for _ in range(runs):
        if dst.exists():
            dst.unlink()
        times.append(timed(lambda: do_copy(src, dst)))
        written = allocated(dst)
        if "reflink" in label:
            written = 0  # shared extents: nothing new was written
    dst.unlink()
    return label, times, written


def ours(src: Path, dst: Path) -> None:
    copy_file(src, dst)


def cp_sparse(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="8G")
    parser.add_argument("--data", default="2G")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    size, data = parse_size(args.size), parse_size(args.data)
    work = Path(tempfile.mkdtemp(prefix="torpor-copy-bench-", dir=args.workdir))
    rows = []
    try:
        print(f"image: {format_size(size)} apparent, {format_size(data)} data; "
              f"{args.runs} runs each, cold cache", file=sys.stderr)
        src = work / "disk.raw"
        make_image(src, size, data)
        rows.append(measure("torpor sparse (ext4)", src, work / "copy.raw", args.runs, ours))
        rows.append(measure("cp --sparse=always (ext4)", src, work / "cp.raw", args.runs,
                            cp_sparse))
        with reflink_filesystem(work, size + 2 * data + (1 << 30)) as xfs_mnt:
            xsrc = xfs_mnt / "disk.raw"
            copy_file(src, xsrc)
            os.sync()
            rows.append(measure("torpor reflink (xfs)", xsrc, xfs_mnt / "clone.raw", args.runs,
                                ours))
            rows.append(measure("cp --sparse=always (xfs)", xsrc, xfs_mnt / "cp.raw",
                                args.runs, cp_sparse))
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)

    baseline = statistics.median(rows[1][1])
    print(f"\n{'method':28} {'median s':>9} {'min s':>7} {'max s':>7} {'written':>11} "
          f"{'vs cp (ext4)':>13}")
    for label, times, written in rows:
        med = statistics.median(times)
        print(f"{label:28} {med:9.3f} {min(times):7.3f} {max(times):7.3f} "
              f"{format_size(written):>11} {med / baseline:12.2f}x")
    print("\nratio = median time / median time of `cp --sparse=always` on ext4 (lower is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
