"""A standby memory-file instance's own disk and RAM file again, after a fork base linked them.

A fork of a standby memory-file instance takes its base (the snapshot its forks map) as
hard links to the source's disk and RAM file: nothing is copied before the forks start.
The base must keep that content, and the source's next run writes both in place (QEMU
maps the RAM file shared and opens the disk read-write), so the source gets copies of
its own: each copied beside it and renamed over it, while the forks come up (the copy is
I/O, their restores CPU). The base keeps the original files, the ones its forks map.

Until then the source must not run: the fork holds its lock throughout, and a fork
killed before the end leaves files with two names, which recovery (first in every locked
operation, and in `check --repair`) gives their own copies the same way.

The RAM file's manifest names the file by identity (inode): the copy's identity is
recorded as `replacing` before the rename, so a kill between the rename and the final
record leaves a RAM file that restore accepts.
"""

from __future__ import annotations

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

OWN_COPY = ".own-copy.tmp"  # ends in .tmp: `check` sweeps one a killed process left


def shared(paths: InstancePaths) -> list[Path]:
    """The instance's RAM file and disk where they have another name (a fork base's)."""
    return [path for path in (paths.memory_file, paths.disk) if _links(path) > 1]


def _links(path: Path) -> int:
    try:
        return path.stat().st_nlink
    except FileNotFoundError:
        return 0


def unshare(ctx: InstanceContext, stop: threading.Event) -> list[Path]:
    """Blocking; the caller holds the instance's lock. Returns the files it replaced."""
    _sweep(ctx.paths)
    if not shared(ctx.paths):
        return []
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
    manifest = _manifest_naming(paths, path)
    if manifest is not None and manifest.memory_file is not None:
        manifest.memory_file.replacing = FileIdentity.of(copy)  # a rename keeps it
        manifest.save(paths.standby_dir)
    faults.point("unshare.copied")
    os.replace(copy, path)
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
