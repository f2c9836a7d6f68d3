"""What the benchmarks share: a scratch data root and a manager on it; a network
namespace of their own for those that need bridges or guest addresses."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torpor.instances.context import Settings
from torpor.manager import InstanceManager


def pss_bytes(pid: int) -> int:
    """A process's proportional set size: pages shared by n processes count 1/n each."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss for process {pid}")


def scratch_manager(prefix: str, parent: str = "/var/tmp") -> tuple[Path, InstanceManager]:
    """A fresh work directory under `parent` (the caller removes it) and a manager on its
    data root, with the accelerator from $TORPOR_ACCEL (default: auto)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    accel = os.environ.get("TORPOR_ACCEL", "auto")
    return workdir, InstanceManager(workdir / "data", Settings(accel=accel))  # type: ignore[arg-type]


@contextlib.contextmanager
def reflink_filesystem(parent: str | Path, size: int) -> Iterator[Path]:
    """An XFS filesystem with reflink (copies are clones) on a loop device: a sparse image
    of `size` bytes in a new directory under `parent`, mounted for the block, then
    unmounted and removed. This host's own filesystems (ext4) have no reflink."""
    work = Path(tempfile.mkdtemp(prefix="torpor-xfs-", dir=parent))
    image, mountpoint = work / "xfs.img", work / "mnt"
    try:
        with open(image, "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
        mountpoint.mkdir()
        subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def fill_half(mgr: InstanceManager, name: str, mem: int) -> None:
    """Half the guest's RAM (`mem` bytes) filled with random data, in its tmpfs."""
    mib = mem // 2 >> 20
    await mgr.exec(name, ["sh", "-c", f"dd if=/dev/urandom of=/tmp/fill bs=1M count={mib}"
                                      " 2>/dev/null"], timeout=900)


NS_ENV = "TORPOR_BENCH_NETNS"


def in_namespace(module: str) -> int:
    """Run `python -m module` (with our arguments) again inside a network namespace made
    for it, and delete the namespace afterwards (the network rule). The rerun sees
    $TORPOR_BENCH_NETNS set."""
    name = f"tpbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        env = dict(os.environ, **{NS_ENV: name})
        return subprocess.run(["ip", "netns", "exec", name, sys.executable, "-m", module,
                               *sys.argv[1:]], env=env, check=False).returncode
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                              check=False).stdout.split()
        subprocess.run(["kill", "-KILL", *pids], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], check=False)


def remove_work(work: Path) -> None:
    """A benchmark's work directory gone, with whatever still runs from it (QEMUs, a
    daemon, relays)."""
    subprocess.run(["pkill", "-KILL", "-f", f"{work}/"], check=False)
    shutil.rmtree(work, ignore_errors=True)
