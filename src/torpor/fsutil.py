"""Small file-system helpers: atomic writes, directory fsync."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every regular file and directory below `path` (files first)."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                fd = os.open(full, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(dirpath))


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


OWNER_SEPARATOR = "@"
DELETING_PREFIX = ".deleting-"


def read_proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from /proc/<pid>/stat; None
    if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def process_alive(pid: int, start_time: int) -> bool:
    """True while that process (pid and start time: not a reuse of the pid) exists and
    has not exited (zombies count as gone)."""
    stat = read_proc_stat(pid)
    return stat is not None and stat[1] == start_time and stat[0] not in ("Z", "X")


def owner_tag() -> str:
    """`<pid>-<start time>` of this process. Put at the end of a temporary file or
    directory's name (after `@`), it lets a sweep tell a dead process's debris from work
    in progress, even once the pid is reused."""
    stat = read_proc_stat(os.getpid())
    assert stat is not None  # we are running
    return f"{os.getpid()}-{stat[1]}"


def owned_name(name: str) -> str:
    return f"{name}{OWNER_SEPARATOR}{owner_tag()}"


def parse_owner(name: str) -> tuple[int, int] | None:
    """(pid, start time) from a name made by `owned_name`; None if it carries none."""
    _, sep, tag = name.rpartition(OWNER_SEPARATOR)
    pid, _, start = tag.partition("-")
    if not sep or not pid.isdigit() or not start.isdigit():
        return None
    return int(pid), int(start)


def remove_tree(path: Path) -> None:
    """Remove a directory tree by first renaming it aside, so it disappears at once (a
    process killed meanwhile leaves `.deleting-*` with its owner tag, for a sweep)."""
    doomed = set_aside(path)
    if doomed is not None:
        shutil.rmtree(doomed, ignore_errors=True)


def set_aside(path: Path) -> Path | None:
    """`remove_tree`'s first step: the tree renamed, durably, to `.deleting-*` beside it
    (tagged with this process, so a sweep leaves it alone while we live). None if there
    was none."""
    if not path.exists():
        return None
    doomed = path.with_name(owned_name(f"{DELETING_PREFIX}{path.name}"))
    os.replace(path, doomed)
    fsync_dir(path.parent)
    return doomed


def allocated_bytes(root: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes a file or tree really occupies (sparse files count their data only): what a
    sparse copy has to move. `skip` names top-level entries of a directory to leave out."""
    try:
        if not root.is_dir():
            return root.stat().st_blocks * 512
    except FileNotFoundError:
        return 0
    total = 0
    for entry in root.iterdir():
        if entry.name in skip or entry.is_symlink():
            continue
        total += allocated_bytes(entry)
    return total


PREFETCH_CHUNK = 8 << 20  # one WILLNEED covers at most ~16 MiB: ask chunk by chunk


def data_extents(fd: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each allocated range of a (sparse) file, by SEEK_DATA/SEEK_HOLE."""
    end, position = os.fstat(fd).st_size, 0
    while position < end:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after position
            return
        position = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, position


def prefetch(path: Path, stop: threading.Event | None = None) -> int:
    """Have the kernel read a file's allocated ranges into the page cache (readahead in
    the background: each call only queues the reads), holes skipped (they would fill the
    cache with zero pages). Stops early when `stop` is set. The bytes asked for."""
    asked = 0
    with open(path, "rb") as f:
        for start, end in data_extents(f.fileno()):
            for offset in range(start, end, PREFETCH_CHUNK):
                if stop is not None and stop.is_set():
                    return asked
                length = min(PREFETCH_CHUNK, end - offset)
                os.posix_fadvise(f.fileno(), offset, length, os.POSIX_FADV_WILLNEED)
                asked += length
    return asked
