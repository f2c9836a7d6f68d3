"""Filesystems for the copy engine's tests: the machine's ext4, an XFS with reflink on a
loop device, and a tiny tmpfs that fills up. Built by the tests themselves (root)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(fstype_args: list[str], source: str, options: str) -> Path:
    target = Path(tempfile.mkdtemp(prefix="tp-mnt-", dir="/tmp"))
    subprocess.run(["mount", *fstype_args, "-o", options, source, str(target)], check=True,
                   capture_output=True)
    return target


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)
    target.rmdir()


@pytest.fixture(scope="session")
def xfs_dir() -> Iterator[Path]:
    """An XFS filesystem with reflink=1 on a loop device."""
    image = Path(tempfile.mkstemp(prefix="tp-xfs-", suffix=".img", dir="/var/tmp")[1])
    os.truncate(image, 2 << 30)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    mnt = _mount([], str(image), "loop")
    try:
        yield mnt
    finally:
        _umount(mnt)
        image.unlink()


@pytest.fixture
def tiny_fs() -> Iterator[Path]:
    """A 4 MiB tmpfs: writes past that fail with ENOSPC."""
    mnt = _mount(["-t", "tmpfs"], "tmpfs", "size=4m")
    try:
        yield mnt
    finally:
        _umount(mnt)


@pytest.fixture
def ext4_dir(tmp_path: Path) -> Path:
    """The machine's own disk. Checked to really be a filesystem without reflink."""
    return tmp_path
