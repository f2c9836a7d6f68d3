from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

MiB = 1 << 20


def make_sparse(path: Path, size: int, extents: list[tuple[int, int]], seed: int = 0) -> None:
    """A file of `size` bytes whose only data are the (offset, length) extents."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, (offset, length) in enumerate(extents):
            f.seek(offset)
            f.write(os.urandom(length) if seed == 0 else bytes([(seed + i) % 255 + 1]) * length)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def shared_extents(path: Path) -> int:
    """How many extents FIEMAP (filefrag -v) reports as shared with another file."""
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return sum(1 for line in out.splitlines() if "shared" in line)


def fs_used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize
