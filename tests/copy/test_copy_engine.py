"""The copy engine on real filesystems."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.copy.helpers import MiB, allocated, fs_used, make_sparse, sha256, shared_extents
from torpor.copy import CopyUnsupported, copy_file, copy_tree
from torpor.copy import engine as copy_engine
from torpor.errors import AlreadyExists

pytestmark = pytest.mark.root


def disk_image(path: Path) -> None:
    """64 MiB apparent, 6 MiB of data in three extents, a trailing hole."""
    make_sparse(path, 64 * MiB, [(0, 1 * MiB), (10 * MiB, 3 * MiB), (40 * MiB, 2 * MiB)])


# --- sparse path (ext4) -----------------------------------------------------------------

def test_ext4_sparse_copy_keeps_holes_and_content(ext4_dir: Path) -> None:
    src, dst = ext4_dir / "disk.raw", ext4_dir / "copy.raw"
    disk_image(src)
    report = copy_file(src, dst)
    assert (report.files_cloned, report.files_sparse) == (0, 1)
    assert report.clone_fallback_reason and "reflink" in report.clone_fallback_reason
    assert sha256(src) == sha256(dst)
    assert dst.stat().st_size == src.stat().st_size
    assert abs(allocated(dst) - allocated(src)) <= 0.03 * allocated(src)
    assert report.bytes_written == 6 * MiB and report.logical_bytes == 64 * MiB


def test_fallback_is_sticky_for_the_rest_of_the_call(ext4_dir: Path) -> None:
    src = ext4_dir / "vm"
    (src / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c", "sub/d"):
        make_sparse(src / name, 4 * MiB, [(MiB, 64 * 1024)])
    calls: list[str] = []
    report = copy_tree(src, ext4_dir / "out", fault=lambda point, p: calls.append(point))
    assert report.files_sparse == 4 and report.files_cloned == 0
    assert report.clone_attempts == 1 and calls.count("clone") == 1


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(1, 64)), max_size=8),
       st.integers(0, 8))
def test_any_sparse_layout_round_trips(ext4_dir: Path, raw_extents: list[tuple[int, int]],
                                       tail_blocks: int) -> None:
    block = 4096
    extents = [(start * 4 * block, length * block) for start, length in raw_extents]
    size = max([o + n for o, n in extents] + [0]) + tail_blocks * block
    src, dst = ext4_dir / "p-src", ext4_dir / "p-dst"
    for p in (src, dst):
        if p.exists():
            p.unlink()
    make_sparse(src, size, extents, seed=7)
    copy_file(src, dst)
    assert sha256(src) == sha256(dst) and dst.stat().st_size == size
    assert allocated(dst) <= allocated(src) + 64 * 1024


# --- reflink path (XFS) -----------------------------------------------------------------

def test_xfs_clone_really_shares_extents(xfs_dir: Path) -> None:
    src, dst = xfs_dir / "disk.raw", xfs_dir / "clone.raw"
    disk_image(src)
    os.sync()
    used_before = fs_used(xfs_dir)
    report = copy_file(src, dst)
    os.sync()
    assert (report.files_cloned, report.files_sparse) == (1, 0)
    assert report.clone_fallback_reason is None and report.bytes_written == 0
    assert sha256(src) == sha256(dst)
    assert shared_extents(dst) >= 1 and shared_extents(src) >= 1
    assert fs_used(xfs_dir) - used_before < 1 * MiB  # 6 MiB of data, no space consumed


def test_xfs_tree_clones_every_file(xfs_dir: Path) -> None:
    src = xfs_dir / "tree"
    (src / "snapshots" / "latest").mkdir(parents=True)
    disk_image(src / "disk.raw")
    (src / "metadata.json").write_text("{}")
    (src / "snapshots" / "latest" / "machine-state").write_bytes(b"m" * 10000)
    report = copy_tree(src, xfs_dir / "tree-copy")
    assert report.files_cloned == 3 and report.clone_attempts == 3 and report.files_sparse == 0
    assert report.method == "reflink"


def test_cross_filesystem_falls_back_with_exdev(xfs_dir: Path, ext4_dir: Path) -> None:
    src = xfs_dir / "cross.raw"
    disk_image(src)
    report = copy_file(src, ext4_dir / "cross.raw")
    assert report.files_sparse == 1
    assert report.clone_fallback_reason and report.clone_fallback_reason.startswith("EXDEV")
    assert sha256(src) == sha256(ext4_dir / "cross.raw")


def test_other_clone_errors_propagate_without_fallback(xfs_dir: Path) -> None:
    src = xfs_dir / "eio.raw"
    disk_image(src)

    def fail_clone(point: str, path: Path) -> None:
        if point == "clone":
            raise OSError(errno.EIO, "injected I/O error")

    with pytest.raises(OSError) as info:
        copy_file(src, xfs_dir / "eio-copy.raw", fault=fail_clone)
    assert info.value.errno == errno.EIO
    assert not any(p.name.startswith(("eio-copy", ".eio-copy")) for p in xfs_dir.iterdir())


# --- errors -------------------------------------------------------------------------------

def test_enospc_propagates_and_leaves_no_partial_file(ext4_dir: Path, tiny_fs: Path) -> None:
    src = ext4_dir / "big.raw"
    make_sparse(src, 64 * MiB, [(0, 6 * MiB)])
    with pytest.raises(OSError) as info:
        copy_file(src, tiny_fs / "big.raw")
    assert info.value.errno == errno.ENOSPC
    assert list(tiny_fs.iterdir()) == []


def test_error_mid_tree_removes_the_whole_partial_tree(ext4_dir: Path) -> None:
    src = ext4_dir / "vm"
    src.mkdir()
    for name in ("a", "b", "c"):
        make_sparse(src / name, MiB, [(0, 4096)])
    seen: list[Path] = []

    def fail_on_third(point: str, path: Path) -> None:
        if point == "extent":
            seen.append(path)
            if len(seen) == 3:
                raise OSError(errno.EIO, "injected")

    with pytest.raises(OSError):
        copy_tree(src, ext4_dir / "out", fault=fail_on_third)
    assert sorted(p.name for p in ext4_dir.iterdir()) == ["vm"]


def test_filesystem_without_seek_data_is_an_explicit_error(
        ext4_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = ext4_dir / "s.raw"
    make_sparse(src, MiB, [(0, 4096)])
    real_lseek = os.lseek

    def no_seek_data(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "unsupported")
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(copy_engine.os, "lseek", no_seek_data)
    with pytest.raises(CopyUnsupported, match="neither reflink nor SEEK_DATA"):
        copy_file(src, ext4_dir / "d.raw")
    assert not (ext4_dir / "d.raw").exists()


def test_existing_destination_refused_unless_replace(ext4_dir: Path) -> None:
    src, dst = ext4_dir / "a", ext4_dir / "b"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(AlreadyExists):
        copy_file(src, dst)
    assert dst.read_bytes() == b"old"
    copy_file(src, dst, replace=True)
    assert dst.read_bytes() == b"new"
    (ext4_dir / "t1").mkdir()
    (ext4_dir / "t2").mkdir()
    (ext4_dir / "t2" / "stale").write_text("x")
    with pytest.raises(AlreadyExists):
        copy_tree(ext4_dir / "t1", ext4_dir / "t2")
    copy_tree(ext4_dir / "t1", ext4_dir / "t2", replace=True)
    assert list((ext4_dir / "t2").iterdir()) == []


# --- the directory walk -------------------------------------------------------------------

def test_walk_skip_symlinks_modes_and_special_files(ext4_dir: Path) -> None:
    src = ext4_dir / "vm"
    for d in ("snapshots/latest", "logs", "run", "ro"):
        (src / d).mkdir(parents=True)
    (src / "snapshots/latest/machine-state").write_bytes(b"s" * 5000)
    (src / "logs/serial.log").write_text("boot")
    (src / "logs/qemu.log").write_text("q")
    (src / "disk.raw").write_bytes(b"d" * 8192)
    (src / "setuid-tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "setuid-tool", 0o4755)
    (src / "private").write_text("secret")
    os.chmod(src / "private", 0o600)
    (src / "ro/file").write_text("r")
    os.chmod(src / "ro", 0o555)
    os.symlink("disk.raw", src / "link-rel")
    os.symlink("/etc/passwd", src / "link-outside")
    os.symlink("missing", src / "link-dangling")
    os.symlink(src / "logs", src / "link-dir")
    os.mkfifo(src / "run/fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "run/qmp.sock"))
    try:
        report = copy_tree(src, ext4_dir / "out", skip=["snapshots", "logs/qemu.log"])
    finally:
        sock.close()
    out = ext4_dir / "out"
    assert not (out / "snapshots").exists()  # a skipped directory prunes its subtree
    assert (out / "logs/serial.log").read_text() == "boot"
    assert not (out / "logs/qemu.log").exists()  # a skipped file drops just that file
    assert sorted(report.skipped) == ["logs/qemu.log", "snapshots"]
    for name, target in (("link-rel", "disk.raw"), ("link-outside", "/etc/passwd"),
                         ("link-dangling", "missing"), ("link-dir", str(src / "logs"))):
        assert (out / name).is_symlink() and os.readlink(out / name) == target
    assert report.symlinks == 4
    assert sorted(report.special_files_skipped) == ["run/fifo", "run/qmp.sock"]
    assert list((out / "run").iterdir()) == []
    assert stat.S_IMODE(os.stat(out / "setuid-tool").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(out / "private").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out / "ro").st_mode) == 0o555
    assert (out / "ro/file").read_text() == "r"
    assert (out / "disk.raw").read_bytes() == b"d" * 8192
    os.chmod(src / "ro", 0o755)
    os.chmod(out / "ro", 0o755)


def test_linked_files_are_the_source_files_and_another_filesystem_gets_copies(
        xfs_dir: Path, ext4_dir: Path) -> None:
    src = ext4_dir / "linked"
    (src / "state").mkdir(parents=True)
    disk_image(src / "disk.raw")
    (src / "state/manifest.json").write_text("{}")
    report = copy_tree(src, ext4_dir / "base", link=["disk.raw"], fsync=True)
    base = ext4_dir / "base"
    assert (base / "disk.raw").stat().st_ino == (src / "disk.raw").stat().st_ino
    assert (base / "state/manifest.json").stat().st_ino != (
        src / "state/manifest.json").stat().st_ino  # only what `link` names
    assert (report.files_linked, report.bytes_linked) == (1, 64 * MiB)
    assert report.bytes_written == 2 and report.method == "sparse+link"
    # A link cannot cross filesystems: the file is copied there, whole.
    report = copy_tree(src, xfs_dir / "elsewhere", link=["disk.raw"])
    assert report.files_linked == 0 and report.files_cloned + report.files_sparse == 2
    assert sha256(xfs_dir / "elsewhere/disk.raw") == sha256(src / "disk.raw")
