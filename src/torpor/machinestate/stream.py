"""The save and load legs of a migration-stream snapshot.

Save: QEMU (paused by the caller) migrates into a file descriptor we pass it (getfd +
`fd:`): the state file itself when uncompressed, or a pipe into a zstd/lz4 process writing
the file, so there is never a second pass over a raw file. A standby's uncompressed state
is hashed as the zero-page filter writes it; any other checksum is computed after QEMU
has exited (`finalize_checksum`), outside the paused window.
Load: QEMU (started with -S) reads from a descriptor: the file itself, inherited at exec
(`-incoming fd:N`, see ExecFeed), or, passed with getfd after `-incoming defer`, a socket
fed by a thread (zstd frames: codec/frames.py; lz4: codec/lz4feed.py), a pipe from a
decompressing process (zstd written as one stream, by the tool, before frames), or the
file (when a capability must be set first). A thread
hashes the stored file meanwhile, and the verdict is in before the caller may resume.
Every child process is waited for on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import select
import socket
import threading
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from torpor.codec import (
    Codec,
    StreamStats,
    checksum_file,
    compressor_argv,
    decompressor_argv,
    stored_hasher,
)
from torpor.codec.frames import FeedAbandoned, FrameStats, FrameWriter
from torpor.codec.frames import feed as frames_feed
from torpor.codec.lz4feed import feed as lz4_feed
from torpor.errors import IntegrityError, OperationFailed
from torpor.hypervisor.process import LAUNCH_TIMEOUT
from torpor.hypervisor.qmp import MigrationEvents, Monitor
from torpor.hypervisor.vmconfig import VMConfig
from torpor.machinestate.manifest import LeftOutZeroPages, StateFile
from torpor.machinestate.zeropages import StreamAbandoned, pump, write_all
from torpor.tasks import in_thread, to_thread

UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s: lifts QEMU 7.2's 128 MiB/s default cap
PIPE_SIZE = 1 << 20
# See _stream_socket. The writer is woken when half of it is free, so 16 MiB already
# makes those wake-ups rare; more would only let each of many concurrent restores (a
# wake of 50 sleeping guests) park more kernel memory ahead of its QEMU.
STREAM_BUFFER = 16 << 20
_SO_SNDBUFFORCE, _SO_RCVBUFFORCE = 32, 33  # Linux; not in Python's socket module
POLL_INTERVAL = 0.005
# An incoming QEMU reading a file answers its monitor only where its RAM loader yields
# (every 32768 pages, measured: a 68 MiB state got no answer before its end), so a fine
# poll costs nothing meanwhile and catches the end at once. From a pipe it answers
# throughout: polling that often would take CPU from the load.
FILE_LOAD_POLL_INTERVAL = 0.001
FD_NAME = "torpor-state"
# With MIGRATION events, a poll only reports progress: each one costs QEMU's main loop,
# where an incoming load runs, a monitor round trip.
EVENT_POLL_INTERVAL = 0.1
PROGRESS_INTERVAL = 0.05  # s between progress reports of a load QEMU does not report on
# How slowly a stored state may load (a cold, slow disk) before a QEMU reading it from
# its command line is given up on: until its loader first yields it answers nothing.
SLOWEST_LOAD_RATE = 20 << 20  # bytes/s
# A load whose input has not advanced for this long is given up on: QEMU is reading
# something that is not (or no longer) a migration stream. Generous: a slow disk or a
# large RAM block being set up stalls for a moment, never for this long.
LOAD_STALL_TIMEOUT = 15.0

Progress = Callable[[int], None]
Sink = int | Callable[[memoryview], object]  # an fd, or what writes to the stored file
# Threads compressing zstd frames while the stream is read (the zstandard library
# releases the GIL): the cores, as the paused window is what they shorten; at most 8,
# which bounds the chunks in flight (2 per thread, 4 MiB each) to 64 MiB.
FRAME_THREADS = min(8, max(2, os.cpu_count() or 2))
Hasher = Any  # what stored_hasher() returns: update(bytes), hexdigest()
T = TypeVar("T")


class MigrationFailed(OperationFailed):
    pass


def _stream_socket() -> tuple[int, int]:
    """A one-way stream for a load fed from here: a socket pair with large buffers. A
    pipe holds at most 1 MiB (more needs CAP_SYS_RESOURCE, which this host's root lacks)
    and wakes its writer at every read from a full pipe: QEMU's 32 KiB reads made that
    ~8000 wake-ups per 256 MiB, and a frames load 1.9x a raw one against 1.5x through
    the socket (measured, docs/design.md). Without CAP_NET_ADMIN the buffers stay at
    the host's maximum."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (reader, writer):
        for forced, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF),
                              (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, forced, STREAM_BUFFER)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, plain, STREAM_BUFFER)
    reader.shutdown(socket.SHUT_WR)
    writer.shutdown(socket.SHUT_RD)
    return reader.detach(), writer.detach()


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # larger pipe buffer: fewer wakeups at GB/s
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


def ram_processed(info: dict[str, Any]) -> int:
    """Outgoing progress: guest RAM dealt with so far (zero pages count, unlike
    `transferred`, so it reaches the total)."""
    ram = info.get("ram") or {}
    return max(0, int(ram.get("total", 0)) - int(ram.get("remaining", 0)))


async def wait_migration(mon: Monitor, progress: Progress | None = None,
                         measure: Callable[[dict[str, Any]], int] = ram_processed,
                         interval: float = POLL_INTERVAL, *,
                         stall_timeout: float | None = None,
                         check: Callable[[], None] | None = None,
                         events: MigrationEvents | None = None,
                         final_query: bool = True) -> dict[str, Any]:
    """Poll query-migrate until the migration has completed; raise if it failed.
    With `events`, a status change ends the wait for the next poll at once (a device
    state-only save completes ~1 ms after it starts: a 5 ms poll was most of it).
    `final_query=False`: a `completed` event ends the wait without the query that would
    report the last progress (a round trip of a paused window that has none to report).
    `progress` gets the increments of `measure(info)`. `stall_timeout`: give up
    (MigrationFailed) when `measure` has not advanced for that long while QEMU says it is
    still at work (QEMU 7.2 can spin forever on a stream that is not a migration stream).
    `check` runs at every poll and may raise (a feeding process that failed)."""
    reported = 0
    last_progress = time.monotonic()
    while True:
        info = await mon.query_migrate()
        status = info.get("status")
        done = measure(info)
        if done > reported:
            if progress is not None:
                progress(done - reported)
            reported, last_progress = done, time.monotonic()
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            reason = info.get("error-desc") or "QEMU gave no reason (see logs/qemu.log)"
            raise MigrationFailed(f"migration {status}: {reason}")
        if check is not None:
            check()
        if stall_timeout is not None and time.monotonic() - last_progress > stall_timeout:
            raise MigrationFailed(f"the load made no progress for {stall_timeout:.0f} s"
                                  f" (stuck at byte {reported} of the stored state)")
        if events is not None:
            if await events.next_or_timeout(interval) == "completed" and not final_query:
                return {"status": "completed"}
        else:
            await asyncio.sleep(interval)


async def prepare_outgoing(mon: Monitor, config: VMConfig) -> None:
    """Call before pausing: round trips the paused window need not contain. A file-backed
    VM's RAM (memory-file mode) is left out of the stream (x-ignore-shared)."""
    await mon.set_migration_parameters(max_bandwidth=UNLIMITED_BANDWIDTH)
    await mon.set_migration_capabilities(events=True,  # wait_migration wakes on them
                                         x_ignore_shared=config.memory_file is not None)


async def _reap(proc: asyncio.subprocess.Process) -> str | None:
    """Wait for a codec process; its error message if it failed."""
    _, err = await proc.communicate()
    if proc.returncode == 0:
        return None
    return err.decode(errors="replace").strip() or f"exit status {proc.returncode}"


def writes_directly(codec: Codec, fresh_block: str | None) -> bool:
    """Whether QEMU writes the state file itself (no compressor, no zero-page filter):
    then the file can be handed to it before the pause (`hand_state_file`)."""
    return codec is Codec.NONE and fresh_block is None


async def hand_state_file(mon: Monitor, directory: Path) -> BinaryIO:
    """Before the pause: the uncompressed state file created and passed to QEMU, so the
    paused window does not carry that monitor round trip (~1 ms). For save_state's
    `handed` (the caller closes it if it never gets there)."""
    out = open(directory / StateFile(codec=Codec.NONE).stored_name(), "xb")  # noqa: SIM115, ASYNC230
    try:
        await mon.send_fd(FD_NAME, out.fileno())
    except BaseException:
        out.close()
        raise
    return out


async def save_state(mon: Monitor, directory: Path, codec: Codec, level: int,
                     progress: Progress | None = None, *, fsync: bool = True,
                     fresh_block: str | None = None, handed: BinaryIO | None = None) -> StateFile:
    """Migrate the paused VM's state (after prepare_outgoing) into
    directory/machine-state[.ext], leaving out the zero pages of `fresh_block` (the RAM a
    receiving QEMU holds zero-filled: vmconfig.zeroed_ram_block).
    An uncompressed state written through the filter is hashed as it is written; any
    other is left to finalize_checksum. fsync=False leaves flushing to the caller
    (a snapshot of a VM that keeps running flushes after resuming it; a standby must
    flush before QEMU quits). `handed`: the file hand_state_file already passed to QEMU
    (only where writes_directly). zstd is written as frames (codec/frames.py); policy `auto`
    saves raw here and compresses after the paused window (jobs.compression)."""
    state = StateFile(codec=codec, level=level)
    hasher = stored_hasher() if codec is Codec.NONE and fresh_block is not None else None
    assert handed is None or writes_directly(codec, fresh_block)
    with handed or open(directory / state.stored_name(), "xb") as out:  # noqa: ASYNC230
        if codec is Codec.NONE:
            left_out = await _migrate_into(mon, out.fileno(), fresh_block, progress, hasher,
                                           handed=handed is not None)
        elif codec is Codec.ZSTD:
            left_out, stats = await _save_as_frames(mon, out.fileno(), level, progress,
                                                    fresh_block)
            state.layout, state.raw_bytes = "frames", stats.raw_bytes
            state.chunks, state.stored_raw_chunks = stats.chunks, stats.stored_raw
        else:
            left_out = await _save_through_compressor(mon, out, codec, level, progress,
                                                      fresh_block)
        if fsync:
            await to_thread(os.fsync, out.fileno())
        state.stored_bytes = os.fstat(out.fileno()).st_size
    if codec is Codec.NONE:
        state.raw_bytes = state.stored_bytes
    if hasher is not None:
        state.checksum = hasher.hexdigest()
    if fresh_block is not None:
        state.zero_pages = LeftOutZeroPages(block=fresh_block, pages=left_out)
    return state


async def _migrate_into(mon: Monitor, sink: Sink, fresh_block: str | None,
                        progress: Progress | None, hasher: Hasher | None = None, *,
                        handed: bool = False) -> int:
    """QEMU's outgoing stream into fd `sink` (the caller's, left open): directly, or
    through the zero-page filter in a thread (which feeds `hasher` what it writes). The
    number of pages left out. `handed`: QEMU already has `sink` (hand_state_file). A
    function as `sink` is handed what to write, from the thread."""
    if fresh_block is None and not callable(sink):
        try:
            if not handed:
                await mon.send_fd(FD_NAME, sink)
            with mon.migration_events() as events:
                await mon.execute("migrate", {"uri": f"fd:{FD_NAME}"})
                # handed: memory-file mode's device state, whose progress is nothing
                await wait_migration(mon, progress, events=events, final_query=not handed)
        except BaseException:
            await _abandon_outgoing(mon)
            raise
        return 0
    read_end, write_end = _pipe()
    stop = threading.Event()
    pumping = asyncio.ensure_future(in_thread(  # awaited on every path below
        lambda stop: _pump(read_end, sink, fresh_block, stop, hasher), stop=stop))
    try:
        await mon.hand_over_fd(FD_NAME, write_end)
        with mon.migration_events() as events:
            await mon.execute("migrate", {"uri": f"fd:{FD_NAME}"})
            await wait_migration(mon, progress, events=events)
    except BaseException as exc:
        await _abandon_outgoing(mon)
        stop.set()  # QEMU let go of the pipe; a hung one must not hold the thread
        try:
            await pumping
        except OSError as write_error:  # e.g. a full disk: the cause of QEMU's failure
            raise OperationFailed(f"could not write the machine state: {write_error}") from exc
        except StreamAbandoned:
            pass
        raise
    try:
        return await pumping
    except OSError as write_error:  # the last bytes, after QEMU had handed them over
        raise OperationFailed(f"could not write the machine state: {write_error}") from None


def _pump(source: int, sink: Sink, fresh_block: str | None, stop: threading.Event,
          hasher: Hasher | None) -> int:
    try:
        if fresh_block is None:
            return _copy(source, sink, stop)
        return pump(source, sink, fresh_block, stop,
                    written=hasher.update if hasher is not None else None)
    finally:
        os.close(source)  # a writer still writing gets EPIPE rather than blocking


def _copy(source: int, sink: Sink, stop: threading.Event) -> int:
    """The stream passed on whole (no zero-page filter): returns 0 pages left out."""
    write = sink if callable(sink) else functools.partial(write_all, sink)
    readable = select.poll()
    readable.register(source, select.POLLIN)
    buffer = memoryview(bytearray(1 << 20))
    while True:
        while not readable.poll(100):
            if stop.is_set():
                raise StreamAbandoned("the migration stream was abandoned before its end")
        got = os.readv(source, [buffer])
        if got == 0:
            return 0
        write(buffer[:got])


async def _save_as_frames(mon: Monitor, sink: int, level: int, progress: Progress | None,
                          fresh_block: str | None) -> tuple[int, FrameStats]:
    """The stream (filtered) into zstd frames compressed on threads (codec/frames.py)."""
    writer = FrameWriter(sink, level, store_incompressible=False, threads=FRAME_THREADS)
    try:
        left_out = await _migrate_into(mon, writer.write, fresh_block, progress)
    except BaseException:
        await to_thread(writer.abort)
        raise
    try:
        return left_out, await to_thread(writer.close)
    except OSError as write_error:
        raise OperationFailed(f"could not write the machine state: {write_error}") from None


async def _abandon_outgoing(mon: Monitor) -> None:
    """After a failed save: QEMU stops migrating and closes its end of the stream."""
    for command, args in (("migrate_cancel", None), ("closefd", {"fdname": FD_NAME})):
        with contextlib.suppress(Exception):
            await mon.execute(command, args, timeout=5)


async def _save_through_compressor(mon: Monitor, out: Any, codec: Codec, level: int,
                                   progress: Progress | None, fresh_block: str | None
                                   ) -> int:
    read_end, write_end = _pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *compressor_argv(codec, level), stdin=read_end, stdout=out, stderr=PIPE)
    finally:
        os.close(read_end)
    try:
        try:
            left_out = await _migrate_into(mon, write_end, fresh_block, progress)
        finally:
            os.close(write_end)  # once QEMU has closed its copy too, the tool sees EOF
    except BaseException as exc:
        error = await _reap(proc)
        if error:  # e.g. "No space left on device": the tool's failure is the cause
            raise OperationFailed(f"{codec} failed while saving: {error}") from exc
        raise
    error = await _reap(proc)
    if error:
        raise OperationFailed(f"{codec} failed while saving: {error}")
    return left_out


def finalize_checksum(directory: Path, state: StateFile) -> StateFile:
    """Hash the stored state file (after QEMU has stopped: outside the paused window)."""
    if state.checksum is None:
        stats = checksum_file(directory / state.stored_name())
        state = state.model_copy(update={"checksum": stats.checksum,
                                         "stored_bytes": stats.stored_bytes})
    return state


def is_fed(codec: Codec, expected: StateFile) -> bool:
    """Whether a thread of ours feeds the state to QEMU (zstd frames, lz4: `feeding`),
    rather than QEMU reading the file or a decompressor tool's pipe."""
    return expected.layout == "frames" or codec is Codec.LZ4


async def load_state(mon: Monitor, path: Path, codec: Codec, expected: StateFile,
                     progress: Progress | None = None, *, ignore_shared: bool = False,
                     stream: FedStream | None = None) -> None:
    """Feed a stored state into an incoming QEMU; raise IntegrityError if its checksum
    does not match (the caller must then not resume the VM). ignore_shared: the stream
    was saved with x-ignore-shared (memory-file mode), so it is read with it too.
    `stream`: the state's feed, started by the caller before QEMU (`feeding`)."""
    if is_fed(codec, expected):
        async with contextlib.AsyncExitStack() as stack:
            if stream is None:
                stream = await stack.enter_async_context(feeding(path, codec))
            await mon.set_migration_capabilities(events=True, x_ignore_shared=ignore_shared)
            await _load_fed(mon, path, expected, progress, stream, codec)
        return
    if ignore_shared:
        await mon.set_migration_capabilities(x_ignore_shared=True)
    verifier = asyncio.create_task(to_thread(checksum_file, path))
    proc: asyncio.subprocess.Process | None = None
    load_error: BaseException | None = None
    try:
        with open(path, "rb") as src:  # noqa: ASYNC230 - instant
            if codec is Codec.NONE:
                await mon.send_fd(FD_NAME, src.fileno())  # QEMU reads the file itself
            else:
                read_end, write_end = _pipe()
                try:
                    # The tool reads our open file: its offset, shared, is the progress.
                    proc = await asyncio.create_subprocess_exec(
                        *decompressor_argv(codec), stdin=src, stdout=write_end, stderr=PIPE)
                finally:
                    os.close(write_end)
                await mon.hand_over_fd(FD_NAME, read_end)
            try:
                await mon.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
                # Incoming QEMU reports no byte counts: the shared offset of the file
                # (QEMU's descriptor, or the decompressor's stdin) tells how far it got.
                await wait_migration(mon, progress,
                                     lambda _: os.lseek(src.fileno(), 0, os.SEEK_CUR),
                                     FILE_LOAD_POLL_INTERVAL if proc is None else POLL_INTERVAL,
                                     stall_timeout=LOAD_STALL_TIMEOUT,
                                     check=lambda: _decompressor_alive(proc, codec))
            except Exception as exc:  # decided below, after the checksum
                load_error = exc
    finally:
        tool_error = None
        if proc is not None:
            if load_error is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # killed by us: its exit status says nothing
                await _reap(proc)
            else:
                tool_error = await _reap(proc)
        await _verdict(verifier, path, expected)
    if tool_error is not None:  # the cause of whatever QEMU made of the stream
        raise IntegrityError(f"{codec} could not decompress {path.name}: {tool_error}")
    if load_error is not None:
        raise MigrationFailed(f"QEMU could not load the machine state: {load_error}")


class _DecompressorFailed(Exception):
    pass


Feed = Callable[[Path, int, threading.Event, Callable[[int], None], Hasher], None]


@dataclass
class FedStream:
    """A compressed state on its way into a socket, fed by a thread (codec/frames.feed
    for zstd frames, codec/lz4feed.feed) that hashes the file as it reads it. Made by
    `feeding`, which may start before QEMU does: the feeder then decodes the state's
    first frames into the socket's buffer (STREAM_BUFFER) while QEMU starts, instead of
    QEMU waiting for them once it reads."""

    read_end: int | None  # for QEMU; None once handed over
    hasher: Hasher
    stop: threading.Event
    feeder: asyncio.Future[None]
    fed: list[int]  # stored bytes dealt with so far

    def hand_over(self) -> int:
        fd, self.read_end = self.read_end, None
        assert fd is not None, "a fed stream goes to one QEMU"
        return fd

    async def finish(self) -> BaseException | None:
        """Stop the feeder if it still waits (QEMU gave up reading) and wait for it: its
        failure, or None."""
        self.stop.set()
        try:
            await self.feeder
        except Exception as exc:
            return exc
        return None


@contextlib.asynccontextmanager
async def feeding(path: Path, codec: Codec) -> AsyncIterator[FedStream]:
    """The state at `path` fed into a new socket by a thread, for the block: the feeder
    is stopped and waited for on every path (`FedStream.finish`)."""
    feed: Feed = frames_feed if codec is Codec.ZSTD else lz4_feed
    hasher, fed = stored_hasher(), [0]
    read_end, write_end = _stream_socket()

    def run(stop: threading.Event) -> None:
        try:
            feed(path, write_end, stop, count, hasher)
        finally:
            os.close(write_end)  # QEMU sees the end of the stream

    def count(stored: int) -> None:
        fed[0] += stored

    stop = threading.Event()
    feeder = asyncio.ensure_future(in_thread(run, stop=stop))  # awaited on every path
    stream = FedStream(read_end, hasher, stop, feeder, fed)
    try:
        yield stream
    finally:
        if stream.read_end is not None:
            os.close(stream.read_end)  # never handed over: the feeder sees a broken pipe
        await stream.finish()  # the load has its outcome already, if it got that far


async def _load_fed(mon: Monitor, path: Path, expected: StateFile,
                    progress: Progress | None, stream: FedStream, codec: Codec) -> None:
    """A compressed state fed to QEMU by `stream`'s thread: the verdict on its checksum
    is in when the feed ends. A feed cut short (QEMU failed) has the rest of the file
    hashed, so a damaged file is still named as such."""
    load_error: BaseException | None = None
    try:
        await mon.hand_over_fd(FD_NAME, stream.hand_over())
        with mon.migration_events() as events:
            await mon.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
            await wait_migration(mon, progress, lambda _: stream.fed[0], EVENT_POLL_INTERVAL,
                                 stall_timeout=LOAD_STALL_TIMEOUT, events=events)
    except Exception as exc:  # decided below, after the checksum
        load_error = exc
    # QEMU gave up reading, or read it all: either way the feeder must not wait on a
    # full socket
    feed_error = await stream.finish()
    if load_error is None and feed_error is None:
        _check_digest(path, expected, stream.hasher.hexdigest())
        return
    verifier = asyncio.ensure_future(to_thread(checksum_file, path))
    await _verdict(verifier, path, expected)  # the file is damaged: that is the error
    if feed_error is not None and not isinstance(feed_error, BrokenPipeError | FeedAbandoned):
        # the cause of whatever QEMU made of the stream (a state saved without checksum)
        raise IntegrityError(f"{codec} could not decompress {path.name}: {feed_error}")
    raise MigrationFailed(f"QEMU could not load the machine state: {load_error}")


def _decompressor_alive(proc: asyncio.subprocess.Process | None, codec: Codec) -> None:
    """A decompressor that failed while QEMU still waits for its stream ends the load."""
    if proc is not None and proc.returncode not in (None, 0):
        raise _DecompressorFailed(f"{codec} exited with status {proc.returncode}")


async def _verdict(verifier: asyncio.Future[StreamStats], path: Path,
                   expected: StateFile) -> None:
    """IntegrityError unless the stored file hashed to its manifest's checksum."""
    try:
        stats = await verifier
    except OSError as exc:
        raise IntegrityError(f"machine state could not be read back: {exc}") from exc
    _check_digest(path, expected, stats.checksum)


def _check_digest(path: Path, expected: StateFile, checksum: str | None) -> None:
    if expected.checksum is not None and checksum != expected.checksum:
        raise IntegrityError(
            f"machine state {path.name} does not match its manifest checksum "
            f"({expected.checksum_algorithm} {checksum} != {expected.checksum})")


def reads_at_exec(codec: Codec, ignore_shared: bool) -> bool:
    """Whether QEMU can take a stored state on its command line (`-incoming fd:N`): one it
    reads itself (uncompressed) and that needs no capability set first (x-ignore-shared
    has no command-line form in QEMU 7.2)."""
    return codec is Codec.NONE and not ignore_shared


@dataclass
class ExecFeed:
    """An uncompressed state that QEMU reads from its command line, so that the load
    starts the moment QEMU has initialised: `-incoming defer`, then getfd and
    migrate-incoming through the monitor, cost about 15 ms of each restore, measured here.
    A thread hashes the file meanwhile. Made by `exec_feed`."""

    fd: int
    path: Path
    expected: StateFile
    verifier: asyncio.Future[StreamStats]
    reported: int = 0

    @property
    def uri(self) -> str:
        return f"fd:{self.fd}"

    @property
    def ready_timeout(self) -> float:
        """How long QEMU may take to answer: at worst, once it has read the whole state."""
        return LAUNCH_TIMEOUT + self.expected.stored_bytes / SLOWEST_LOAD_RATE

    def read_so_far(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)  # QEMU's descriptor shares our offset

    async def until_read_from(self, qemu: asyncio.Future[Any]) -> None:
        """Until QEMU has begun to read the state (or has finished starting, or failed)."""
        while not qemu.done() and self.read_so_far() == 0:
            await asyncio.wait({qemu}, timeout=FILE_LOAD_POLL_INTERVAL)

    async def followed(self, qemu: asyncio.Future[T], progress: Progress | None) -> T:
        """QEMU's launch once its monitor answers (the state read, or a first part of
        it: the load goes on, see `completed`), reporting its progress meanwhile. If it
        failed while loading, a state that fails its checksum is the error
        (IntegrityError), else QEMU's own message (MigrationFailed)."""
        while not qemu.done():
            await asyncio.wait({qemu}, timeout=PROGRESS_INTERVAL)
            self._report(progress)
        try:
            return qemu.result()
        except OperationFailed as exc:
            if self.read_so_far() == 0:
                raise  # it never got to the state
            await _verdict(self.verifier, self.path, self.expected)
            raise MigrationFailed(f"QEMU could not load the machine state: {exc}") from exc

    async def lost(self, error: Exception, detail: str) -> MigrationFailed:
        """QEMU went away mid-load (its monitor refused us, or dropped): a state that
        fails its checksum is the error (IntegrityError, raised), else QEMU's own message
        (`detail`, from its log) in the MigrationFailed returned."""
        await _verdict(self.verifier, self.path, self.expected)
        return MigrationFailed(f"QEMU stopped while loading the machine state ({error})"
                               + (f": {detail}" if detail else ""))

    async def completed(self, mon: Monitor, progress: Progress | None) -> None:
        """Until the load has completed and the state's checksum is verified."""
        try:
            await wait_migration(mon, interval=FILE_LOAD_POLL_INTERVAL)
        except MigrationFailed:
            await _verdict(self.verifier, self.path, self.expected)
            raise
        self._report(progress)
        await _verdict(self.verifier, self.path, self.expected)

    def _report(self, progress: Progress | None) -> None:
        done = self.read_so_far()
        if progress is not None and done > self.reported:
            progress(done - self.reported)
            self.reported = done


@contextlib.asynccontextmanager
async def exec_feed(path: Path, expected: StateFile) -> AsyncIterator[ExecFeed]:
    """The state file opened for an incoming QEMU to inherit, its hash under way."""
    with open(path, "rb") as state:  # noqa: ASYNC230 - instant
        verifier = asyncio.ensure_future(to_thread(checksum_file, path))
        try:
            yield ExecFeed(state.fileno(), path, expected, verifier)
        finally:
            await asyncio.wait({verifier})  # a thread cannot be cancelled; it ends at EOF
