"""Reflink-first copies with a narrow, sticky sparse fallback.

For each regular file the engine first asks the filesystem to share the source's
extents (FICLONE). Only an answer meaning "this filesystem cannot clone this pair"
switches the rest of the call to a sparse copy (sticky: no further clone attempts);
any other error propagates and the partial destination is removed. The sparse copy
walks data extents with SEEK_DATA/SEEK_HOLE, copies each in the kernel
(copy_file_range, falling back to pread/pwrite), and sets the size so holes stay holes.
A filesystem that can do neither raises CopyUnsupported: there is no silent dense copy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

from torpor.errors import AlreadyExists, OperationFailed

FICLONE = 0x40049409  # _IOW(0x94, 9, int)

# errno from FICLONE that mean "this filesystem cannot clone this pair of files".
# These, and only these, switch the copy to the sparse path:
CLONE_UNSUPPORTED_ERRNOS: dict[int, str] = {
    # The filesystem has no reflink support at all (ext4, tmpfs, XFS without reflink=1).
    errno.EOPNOTSUPP: "filesystem does not support reflink",
    # Source and destination are on different filesystems: extents cannot be shared.
    errno.EXDEV: "source and destination are on different filesystems",
    # The VFS and some filesystems answer EINVAL for pairs they cannot share even though
    # both are regular files we opened correctly: btrfs for a NOCOW/COW mix, NFS/CIFS
    # servers without clone, and older kernels without remap support.
    errno.EINVAL: "filesystem cannot clone this pair of files",
    # The filesystem does not know the ioctl at all (FUSE, some overlay setups).
    errno.ENOTTY: "filesystem does not implement the clone ioctl",
}
# Deliberately NOT in the set (they propagate): ENOSPC and EDQUOT (out of space is not
# a reason to write more data), EIO (hardware), EACCES/EPERM (permissions, immutable
# files), ETXTBSY (an active swap file), EBADF/EISDIR (bugs in the caller), EFBIG.
# ENOTSUP is the same number as EOPNOTSUPP on Linux.

# errno from copy_file_range after which the same extent is copied with pread/pwrite:
# no syscall (old kernels), cross-filesystem refusal, or a filesystem without support.
_CFR_FALLBACK_ERRNOS = {errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL}
_CHUNK = 8 << 20

FaultHook = Callable[[str, Path], None]


class CopyUnsupported(OperationFailed):
    """The filesystem can neither clone nor report holes: refuse to copy densely."""


class CopyCancelled(OperationFailed):
    """The caller's cancel event was set; the partial destination has been removed."""


@dataclass
class CopyReport:
    logical_bytes: int = 0
    bytes_written: int = 0  # by the sparse path; a clone writes nothing
    bytes_cloned: int = 0  # logical size of the files cloned
    files_cloned: int = 0
    files_sparse: int = 0
    files_linked: int = 0  # hard links (`link=`): nothing copied
    bytes_linked: int = 0
    clone_attempts: int = 0
    clone_fallback_reason: str | None = None
    dirs: int = 0
    symlinks: int = 0
    skipped: list[str] = field(default_factory=list)
    special_files_skipped: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def method(self) -> str:
        if self.files_cloned and self.files_sparse:
            copied = "mixed"
        else:
            copied = "reflink" if self.files_cloned else "sparse"
        return f"{copied}+link" if self.files_linked else copied

    def merged(self, other: CopyReport) -> CopyReport:
        """One report for two copies that make up one destination: counts, lists and
        times add up; the first fallback reason stands."""
        merged = CopyReport()
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "clone_fallback_reason":
                setattr(merged, f.name, mine or theirs)
            else:
                setattr(merged, f.name, mine + theirs)
        return merged

    def as_dict(self) -> dict[str, object]:
        return {
            "logical_bytes": self.logical_bytes, "bytes_written": self.bytes_written,
            "bytes_cloned": self.bytes_cloned,
            "files_cloned": self.files_cloned, "files_sparse": self.files_sparse,
            "files_linked": self.files_linked, "bytes_linked": self.bytes_linked,
            "clone_attempts": self.clone_attempts,
            "clone_fallback_reason": self.clone_fallback_reason, "dirs": self.dirs,
            "symlinks": self.symlinks, "skipped": self.skipped,
            "special_files_skipped": self.special_files_skipped,
            "elapsed_s": round(self.elapsed_s, 6), "method": self.method,
        }


@dataclass
class _CopyCall:
    """State of one copy_file/copy_tree call: the sticky clone decision lives here."""

    report: CopyReport
    fault: FaultHook | None
    progress: Callable[[int], None] | None
    fsync: bool
    cancel: threading.Event | None = None
    clone_enabled: bool = True
    link: frozenset[str] = frozenset()

    def inject(self, point: str, path: Path) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise CopyCancelled(f"copy cancelled at {path}")
        if self.fault is not None:
            self.fault(point, path)

    def advance(self, nbytes: int) -> None:
        self.report.bytes_written += nbytes
        if self.progress is not None:
            self.progress(nbytes)


def _try_clone(call: _CopyCall, src_fd: int, dst_fd: int, dst: Path) -> bool:
    if not call.clone_enabled:
        return False
    call.report.clone_attempts += 1
    try:
        call.inject("clone", dst)
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno not in CLONE_UNSUPPORTED_ERRNOS:
            raise
        call.clone_enabled = False  # sticky for the rest of this call
        call.report.clone_fallback_reason = (
            f"{errno.errorcode.get(exc.errno or 0, exc.errno)}: "
            f"{CLONE_UNSUPPORTED_ERRNOS[exc.errno]}")
        return False
    return True


def _data_extents(fd: int, size: int, path: Path) -> Iterable[tuple[int, int]]:
    """(offset, length) of each data extent, from SEEK_DATA/SEEK_HOLE."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past offset: the rest is a hole
                return
            if exc.errno == errno.EINVAL:
                raise CopyUnsupported(
                    f"{path}: the filesystem supports neither reflink nor SEEK_DATA/SEEK_HOLE;"
                    " refusing a dense copy") from exc
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if end > start:
            yield start, end - start
        offset = end


def _copy_range(call: _CopyCall, src_fd: int, dst_fd: int, offset: int, length: int,
                dst: Path) -> None:
    end = offset + length
    use_cfr = True
    while offset < end:
        call.inject("extent", dst)
        count = min(_CHUNK, end - offset)
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, count, offset, offset)
            except OSError as exc:
                if exc.errno not in _CFR_FALLBACK_ERRNOS:
                    raise
                use_cfr = False
                continue
            if n == 0:  # source shrank under us
                return
        else:
            buf = os.pread(src_fd, count, offset)
            if not buf:
                return
            n = os.pwrite(dst_fd, buf, offset)
        offset += n
        call.advance(n)


def _sparse_copy(call: _CopyCall, src_fd: int, dst_fd: int, size: int, dst: Path) -> None:
    call.inject("file", dst)
    for offset, length in _data_extents(src_fd, size, dst):
        _copy_range(call, src_fd, dst_fd, offset, length, dst)
    os.ftruncate(dst_fd, size)  # a trailing hole stays a hole


def _file_mode(st: os.stat_result) -> int:
    return stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID)


def _copy_regular(call: _CopyCall, src: Path, dst: Path) -> None:
    """Copy one regular file to a new path; on any error the partial file is removed."""
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(src_fd)
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            if _try_clone(call, src_fd, dst_fd, dst):
                call.report.files_cloned += 1
                call.report.bytes_cloned += st.st_size
                if call.progress is not None:
                    call.progress(st.st_size)
            else:
                _sparse_copy(call, src_fd, dst_fd, st.st_size, dst)
                call.report.files_sparse += 1
            os.fchmod(dst_fd, _file_mode(st))
            if call.fsync:
                os.fsync(dst_fd)
        except BaseException:
            os.close(dst_fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dst)
            raise
        os.close(dst_fd)
        call.report.logical_bytes += st.st_size
    finally:
        os.close(src_fd)


def _link_regular(call: _CopyCall, src: Path, dst: Path) -> None:
    """A second name for the source's file: instant, and shared (see copy_tree's `link`).
    Another filesystem cannot link: the file is copied."""
    call.inject("file", dst)
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_regular(call, src, dst)
        return
    size = os.stat(dst).st_size
    if call.fsync:  # the data was the source's to make durable; cheap if it did
        fd = os.open(dst, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    call.report.files_linked += 1
    call.report.bytes_linked += size
    call.report.logical_bytes += size
    if call.progress is not None:
        call.progress(size)


def _staging_path(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.copying-{os.getpid()}")


def _prepare_destination(dst: Path, replace: bool) -> None:
    if os.path.lexists(dst) and not replace:
        raise AlreadyExists(f"destination exists: {dst}")
    if not dst.parent.is_dir():
        raise OperationFailed(f"destination directory does not exist: {dst.parent}")


def _publish(staging: Path, dst: Path) -> None:
    """Rename the finished copy into place, replacing (and then deleting) any old one."""
    old = None
    if os.path.lexists(dst):
        old = dst.with_name(f".{dst.name}.replaced-{os.getpid()}")
        os.replace(dst, old)
    os.replace(staging, dst)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, replace: bool = False,
              fsync: bool = False, fault: FaultHook | None = None,
              progress: Callable[[int], None] | None = None,
              cancel: threading.Event | None = None) -> CopyReport:
    """Copy one regular file; the destination appears complete or not at all."""
    src_p, dst_p = Path(src), Path(dst)
    started = time.monotonic()
    if not src_p.is_file() or src_p.is_symlink():
        raise OperationFailed(f"not a regular file: {src_p}")
    _prepare_destination(dst_p, replace)
    call = _CopyCall(CopyReport(), fault, progress, fsync, cancel)
    staging = _staging_path(dst_p)
    _copy_regular(call, src_p, staging)
    _publish(staging, dst_p)
    call.report.elapsed_s = time.monotonic() - started
    return call.report


def _normalise_skip(skip: Iterable[str | os.PathLike[str]]) -> set[str]:
    normalised = set()
    for item in skip:
        rel = os.path.normpath(os.fspath(item))
        if os.path.isabs(rel) or rel.startswith(".."):
            raise OperationFailed(f"skip paths are relative to the source root: {item}")
        normalised.add(rel)
    return normalised


def _copy_dir(call: _CopyCall, src: Path, dst: Path, rel: str, skip: set[str]) -> None:
    st = os.stat(src, follow_symlinks=False)
    os.mkdir(dst, 0o700)
    call.report.dirs += 1
    with os.scandir(src) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            entry_rel = os.path.join(rel, entry.name) if rel else entry.name
            if entry_rel in skip:
                call.report.skipped.append(entry_rel)  # a directory prunes its subtree
                continue
            target = dst / entry.name
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), target)
                call.report.symlinks += 1
            elif entry.is_dir(follow_symlinks=False):
                _copy_dir(call, Path(entry.path), target, entry_rel, skip)
            elif entry.is_file(follow_symlinks=False) and entry_rel in call.link:
                _link_regular(call, Path(entry.path), target)
            elif entry.is_file(follow_symlinks=False):
                _copy_regular(call, Path(entry.path), target)
            else:  # sockets, FIFOs, device nodes: runtime objects, never copied
                call.report.special_files_skipped.append(entry_rel)
    # Mode last, so a read-only source directory can still be filled.
    os.chmod(dst, _file_mode(st))
    if call.fsync:
        fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def copy_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
              skip: Iterable[str | os.PathLike[str]] = (), replace: bool = False,
              fsync: bool = False, fault: FaultHook | None = None,
              progress: Callable[[int], None] | None = None,
              cancel: threading.Event | None = None,
              link: Iterable[str | os.PathLike[str]] = ()) -> CopyReport:
    """Copy a directory tree. It is built beside `dst` and renamed into place, so the
    destination is complete or absent: a failed copy leaves nothing behind.
    `link`: regular files (relative paths, like `skip`) hard-linked instead of copied.
    Both names are then one file: the caller must see that neither is written in place
    while the other needs its content (replace a file by renaming a copy over it)."""
    src_p, dst_p = Path(src), Path(dst)
    started = time.monotonic()
    if not src_p.is_dir() or src_p.is_symlink():
        raise OperationFailed(f"not a directory: {src_p}")
    _prepare_destination(dst_p, replace)
    call = _CopyCall(CopyReport(), fault, progress, fsync, cancel,
                     link=frozenset(_normalise_skip(link)))
    staging = _staging_path(dst_p)
    try:
        _copy_dir(call, src_p, staging, "", _normalise_skip(skip))
        _publish(staging, dst_p)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    call.report.elapsed_s = time.monotonic() - started
    return call.report
