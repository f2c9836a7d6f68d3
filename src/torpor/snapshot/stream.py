"""The save and load legs of a migration-stream snapshot.

Save: QEMU (paused by the caller) migrates into a file descriptor we pass it (getfd +
`fd:`): the state file itself when uncompressed, or a pipe whose other end a thread
compresses and hashes, so there is never a second pass over a raw file.
Load: QEMU (started with -incoming defer -S) reads from a passed descriptor: the file
itself, or a pipe fed by a thread that hashes and decompresses. The checksum is checked
concurrently with the load, and decided before the caller may resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torpor.codec import (
    Codec,
    StreamStats,
    checksum_file,
    compress_fd_to_file,
    decompress_file_to_fd,
)
from torpor.errors import IntegrityError, OperationFailed
from torpor.hypervisor.qmp import Monitor
from torpor.snapshot.manifest import StateFile

UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s: lifts QEMU 7.2's 128 MiB/s default cap
PIPE_SIZE = 1 << 20
POLL_INTERVAL = 0.005
FD_NAME = "torpor-state"

Progress = Callable[[int], None]


class MigrationFailed(OperationFailed):
    pass


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # larger pipe buffer: fewer wakeups at GB/s
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


async def wait_migration(mon: Monitor, progress: Progress | None = None) -> dict[str, Any]:
    """Poll query-migrate until the migration has completed; raise if it failed."""
    reported = 0
    while True:
        info = await mon.query_migrate()
        status = info.get("status")
        ram = info.get("ram") or {}
        transferred = int(ram.get("transferred", 0))
        if progress is not None and transferred > reported:
            progress(transferred - reported)
            reported = transferred
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise MigrationFailed(f"migration {status}: {info.get('error-desc', 'no detail')}")
        await asyncio.sleep(POLL_INTERVAL)


async def prepare_outgoing(mon: Monitor) -> None:
    """Call before pausing: it is a round trip the paused window need not contain."""
    await mon.set_migration_parameters(max_bandwidth=UNLIMITED_BANDWIDTH)


async def save_state(mon: Monitor, directory: Path, codec: Codec, level: int,
                     progress: Progress | None = None) -> StateFile:
    """Migrate the paused VM's state (after prepare_outgoing) into
    directory/machine-state[.ext]. The file is fsynced; the checksum is filled in here when
    it came for free (compressed)."""
    state = StateFile(codec=codec, level=level)
    path = directory / state.stored_name()
    out = open(path, "xb")  # noqa: SIM115, ASYNC230 - closed in finally; opening is instant
    try:
        if codec is Codec.NONE:
            await mon.send_fd(FD_NAME, out.fileno())
            await mon.execute("migrate", {"uri": f"fd:{FD_NAME}"})
            await wait_migration(mon, progress)
        else:
            stats = await _save_through_pipe(mon, out, codec, level, progress)
            state.raw_bytes, state.checksum = stats.raw_bytes, stats.checksum
        out.flush()
        await asyncio.to_thread(os.fsync, out.fileno())
        state.stored_bytes = os.fstat(out.fileno()).st_size
        if codec is Codec.NONE:
            state.raw_bytes = state.stored_bytes
    finally:
        out.close()
    return state


def _compress_then_close(read_end: int, out: Any, codec: Codec, level: int,
                         progress: Progress | None) -> StreamStats:
    try:
        return compress_fd_to_file(read_end, out, codec, level, progress)
    finally:
        # Closing our end on any exit (ENOSPC included) makes QEMU's next write fail, so
        # the migration ends instead of blocking on a pipe nobody reads.
        os.close(read_end)


async def _save_through_pipe(mon: Monitor, out: Any, codec: Codec, level: int,
                             progress: Progress | None) -> StreamStats:
    read_end, write_end = _pipe()
    compressor = asyncio.create_task(asyncio.to_thread(
        _compress_then_close, read_end, out, codec, level, progress))
    try:
        try:
            await mon.send_fd(FD_NAME, write_end)
        finally:
            os.close(write_end)  # QEMU has its own copy; ours would hide EOF
        await mon.execute("migrate", {"uri": f"fd:{FD_NAME}"})
        await wait_migration(mon)
    except BaseException:
        with contextlib.suppress(Exception):
            await mon.execute("migrate_cancel", timeout=5)
        raise
    finally:
        # Always wait for the thread; its error (e.g. ENOSPC) is the one that explains.
        stats = await compressor
    return stats


def finalize_checksum(directory: Path, state: StateFile) -> StateFile:
    """Hash an uncompressed state file (done after QEMU stopped: outside the pause)."""
    if state.checksum is None:
        stats = checksum_file(directory / state.stored_name())
        state = state.model_copy(update={"checksum": stats.checksum,
                                         "stored_bytes": stats.stored_bytes})
    return state


async def load_state(mon: Monitor, path: Path, codec: Codec, expected: StateFile,
                     progress: Progress | None = None) -> None:
    """Feed a stored state into an incoming QEMU; raise IntegrityError if its checksum
    does not match (the caller must then not resume the VM)."""
    src = open(path, "rb")  # noqa: SIM115, ASYNC230 - closed in finally; opening is instant
    read_end = -1
    try:
        if codec is Codec.NONE:
            # QEMU reads the file itself; a thread hashes the same (cached) pages meanwhile.
            verifier = asyncio.create_task(asyncio.to_thread(checksum_file, path))
            await mon.send_fd(FD_NAME, src.fileno())
        else:
            read_end, write_end = _pipe()
            verifier = asyncio.create_task(asyncio.to_thread(
                _feed_pipe, src, write_end, codec))
            await mon.send_fd(FD_NAME, read_end)
            os.close(read_end)
            read_end = -1
        load_error: BaseException | None = None
        try:
            await mon.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
            await wait_migration(mon, progress)
        except Exception as exc:  # decided below, after the checksum
            load_error = exc
        stats = await _finish_verifier(verifier)
    finally:
        src.close()
        if read_end >= 0:
            os.close(read_end)
    if expected.checksum is not None and stats.checksum != expected.checksum:
        raise IntegrityError(
            f"machine state {path.name} does not match its manifest checksum "
            f"({expected.checksum_algorithm} {stats.checksum} != {expected.checksum})")
    if load_error is not None:
        raise MigrationFailed(f"QEMU could not load the machine state: {load_error}")


def _feed_pipe(src: Any, write_end: int, codec: Codec) -> StreamStats:
    try:
        return decompress_file_to_fd(src, write_end, codec)
    finally:
        os.close(write_end)  # EOF for QEMU


async def _finish_verifier(verifier: asyncio.Task[StreamStats]) -> StreamStats:
    try:
        return await verifier
    except OSError as exc:
        raise IntegrityError(f"machine state could not be read back: {exc}") from exc
    except Exception as exc:  # zstd/lz4 raise their own error types on corrupt input
        raise IntegrityError(f"machine state is corrupt: {exc}") from exc
