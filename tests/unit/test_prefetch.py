"""Prefetching a sparse RAM file: its data comes into the page cache, its holes do not
(they would fill the cache with zero pages for nothing)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from torpor.fsutil import data_extents, prefetch

MIB = 1 << 20


def resident(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def sparse_file(path: Path) -> None:
    with open(path, "wb") as f:
        f.truncate(256 * MIB)
        for offset in (16 * MIB, 128 * MIB):
            f.seek(offset)
            f.write(os.urandom(24 * MIB))
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def test_prefetch_reads_the_data_ranges_and_skips_the_holes(tmp_path: Path) -> None:
    path = tmp_path / "memory"
    sparse_file(path)
    with open(path, "rb") as f:
        extents = list(data_extents(f.fileno()))
    assert sum(end - start for start, end in extents) == 48 * MIB
    assert resident(path) < 4 * MIB  # dropped
    assert prefetch(path) == 48 * MIB
    deadline = time.monotonic() + 10  # the reads were queued: they land meanwhile
    while resident(path) < 48 * MIB and time.monotonic() < deadline:
        time.sleep(0.02)
    assert 48 * MIB <= resident(path) < 56 * MIB  # the data, not the 208 MiB of holes


def test_prefetch_stops_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "memory"
    sparse_file(path)
    stop = threading.Event()
    stop.set()
    assert prefetch(path, stop) == 0
