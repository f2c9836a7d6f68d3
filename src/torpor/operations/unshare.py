"""A standby memory-file instance's own disk and RAM file again, after a fork base linked them.

A fork of a standby memory-file instance takes its base (the snapshot its forks map) as
hard links to the source's disk and RAM file: nothing is copied for the base, and if the
forks (and so the base) are gone before the source runs again, nothing ever is. The base
must keep that content, and a run of the source writes both in place (QEMU maps the RAM
file shared and opens the disk read-write). So before any operation on the source that
is not known to only read them (states.LEAVES_FILES_SHARED: fork, snapshot, delete,
configure), the instance guard (Registry.locked, after recovery) gives it copies of its
own: each copied beside the file and renamed over it, the base keeping the original
inodes, the ones its forks map. Every way to run or write an instance is a locked
operation; the daemon's restore pool makes the copies in the background as it prepares
a restore. A kill during the copies leaves the files shared: the next one makes them.

The RAM file's manifest names the file by identity (inode): the copy's identity is
recorded as `replacing` before the rename, so a kill between the rename and the final
record leaves a RAM file that restore accepts.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from torpor import faults
from torpor.copy import copy_file
from torpor.fsutil import fsync_dir
from torpor.instances.context import InstanceContext
from torpor.jobs import compression as compression_jobs
from torpor.machinestate.manifest import FileIdentity, Manifest, rebind_memory_file
from torpor.paths import InstancePaths
from torpor.tasks import in_thread

log = logging.getLogger(__name__)
OWN_COPY = ".own-copy.tmp"  # ends in .tmp: `check` sweeps one a killed process left


def shared(paths: InstancePaths) -> list[Path]:
    """The instance's RAM file and disk where they have another name (a fork base's)."""
    return [path for path in (paths.memory_file, paths.disk) if _links(path) > 1]


def _links(path: Path) -> int:
    try:
        return path.stat().st_nlink
    except FileNotFoundError:
        return 0


async def own_files(ctx: InstanceContext) -> None:
    """The instance's own disk and RAM file, if a fork base shares them (cheap if not:
    two stat calls). The caller holds its lock."""
    if shared(ctx.paths):
        replaced = await in_thread(lambda stop: _unshare(ctx, stop))
        log.info("instance %s: made its own %s, shared with a fork base until now",
                 ctx.name, " and ".join(path.name for path in replaced))


def _unshare(ctx: InstanceContext, stop: threading.Event) -> list[Path]:
    """Blocking; the caller holds the instance's lock. Returns the files it replaced."""
    _sweep(ctx.paths)
    # The compression job replaces the RAM file too: stopped first, queued again after.
    plan = compression_jobs.prepare_for_read(ctx)
    try:
        replaced = shared(ctx.paths)  # a decompressed RAM file is a new file already
        for path in replaced:
            _replace_with_copy(ctx.paths, path, stop)
    finally:
        compression_jobs.resume_plan(ctx, plan, slots=ctx.settings.compression_jobs,
                                     rate_limit=ctx.settings.compression_rate_limit)
    return replaced


def _replace_with_copy(paths: InstancePaths, path: Path, stop: threading.Event) -> None:
    copy = path.with_name(f".{path.name}{OWN_COPY}")
    copy_file(path, copy, fsync=True, cancel=stop)
    try:
        manifest = _manifest_naming(paths, path)
        if manifest is not None and manifest.memory_file is not None:
            manifest.memory_file.replacing = FileIdentity.of(copy)  # a rename keeps it
            manifest.save(paths.standby_dir)
        faults.point("unshare.copied")
        os.replace(copy, path)
    except BaseException:
        copy.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    faults.point("unshare.replaced")
    if manifest is not None:
        rebind_memory_file(paths.standby_dir, path)


def _manifest_naming(paths: InstancePaths, path: Path) -> Manifest | None:
    """The saved state's manifest, if it names `path` as its RAM file."""
    if path != paths.memory_file or not paths.standby_dir.exists():
        return None
    return Manifest.load(paths.standby_dir)


def _sweep(paths: InstancePaths) -> None:
    """Copies (and the copy engine's staging files) a killed unshare left behind."""
    for path in (paths.disk, paths.memory_file):
        for leftover in path.parent.glob(f"*.{path.name}{OWN_COPY}*"):
            leftover.unlink(missing_ok=True)
