"""qemu-guest-agent client.

The agent's port is a `pipe` chardev (FIFOs `<path>.in`, `.out`, held open by QEMU), so
the guest always sees a host connected: qemu-ga sleeps 100 ms after every read that
finds no host (qga/main.c, `channel_event_cb`), and with a socket port each new client
waited out one of those sleeps (a guest command took ~120 ms, ~20 ms now). A lock on the
request FIFO gives one client at a time, as QEMU's socket did. QEMUs started before the
pipe are reached on their socket (`<path>.sock`).

The agent channel is a byte stream that may hold stale replies from an earlier client
(or from before a snapshot), so every session starts with guest-sync-delimited: the
agent answers with 0xFF followed by our random id, and everything before it is discarded.
Every call has a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import random
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from torpor.errors import OperationFailed
from torpor.guest.result import ExecResult
from torpor.hypervisor.vmconfig import pipe_fifos

DELIMITER = b"\xff"
# guest-exec has no completion event: its status is polled, every EXEC_POLL_SHORT for the
# first EXEC_SHORT seconds, then backing off to EXEC_POLL_LONG.
EXEC_POLL_SHORT, EXEC_SHORT, EXEC_POLL_LONG = 0.02, 1.0, 0.1


# The longest reply line: guest-exec-status with OUTPUT_LIMIT of stdout and as much of
# stderr, base64 (a 16 MiB limit failed on a 13 MiB output: "chunk exceed the limit").
READ_LIMIT = 48 << 20


async def _lock(fd: int, timeout: float, what: Path) -> None:
    """An exclusive flock on `fd`, waiting up to `timeout` for the client holding it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise AgentError(f"the guest agent port {what} stayed busy with another"
                                 f" client for {timeout:g} s") from None
            await asyncio.sleep(0.005)


def _raise_if_cancelled() -> None:
    """Python 3.11's `asyncio.wait_for` returns its inner result (here: a failed connect
    to a socket QEMU removed as it exited) when a cancellation arrives at that moment, and
    the cancellation is lost; a retry loop that swallowed it would run to its timeout."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


# What the channel can throw at a reader or writer: a reset socket, a closed stream,
# a line longer than the limit, bytes that are not JSON.
_TRANSPORT_ERRORS = (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                     ValueError)


class AgentError(OperationFailed):
    pass


# qemu-ga's error when it cannot start the command (GLib's g_spawn): "Failed to execute
# child process “ls-la” (No such file or directory)".
_SPAWN_FAILED = re.compile(r"Failed to execute child process .*\((?P<why>[^()]*)\)")
# As a shell reports a command it cannot run: 127 not found, 126 found but not runnable.
NOT_FOUND, NOT_RUNNABLE = 127, 126


def _not_started(command: str, message: str) -> ExecResult | None:
    """A command the guest could not start, as a shell would report it (exit code and a
    line on stderr); None if `message` is another failure."""
    found = _SPAWN_FAILED.search(message)
    if found is None:
        return None
    why = found.group("why")
    code = NOT_FOUND if why == "No such file or directory" else NOT_RUNNABLE
    return ExecResult(exit_code=code, stdout=b"",
                      stderr=f"torpor: {command}: {why.lower()} (in the guest)\n".encode())


class GuestAgent:
    """One connection to qemu-ga. Use `async with GuestAgent.connect(path) as agent:`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 read_side: asyncio.BaseTransport | None = None) -> None:
        self._reader = reader
        self._writer = writer
        self._read_side = read_side  # a pipe's own transport for the replies
        self._sent_sync: int | None = None  # a guest-sync already on its way

    @classmethod
    async def _open(cls, path: Path, timeout: float) -> GuestAgent:
        """A connection to the agent port at `path` (paths.agent_pipe): its FIFOs, or for
        a QEMU started before them, the unix socket beside them."""
        requests, replies = pipe_fifos(path)
        if requests.exists():
            return await cls._open_pipe(requests, replies, timeout)
        socket = path.with_name(path.name + ".sock")
        try:
            async with asyncio.timeout(timeout):  # not wait_for: see hypervisor/qmp.py
                reader, writer = await asyncio.open_unix_connection(str(socket),
                                                                    limit=READ_LIMIT)
        except (OSError, TimeoutError) as exc:
            raise AgentError(f"cannot connect to the guest agent socket {socket}: {exc}") from exc
        return cls(reader, writer)

    @classmethod
    async def _open_pipe(cls, requests: Path, replies: Path, timeout: float) -> GuestAgent:
        """The port's FIFOs, ours alone: QEMU serves a socket to one client at a time, and
        a lock on the request FIFO does that here (the kernel drops it if we die)."""
        try:
            # ENXIO: no QEMU holds the FIFO (it has exited)
            request_fd = os.open(requests, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise AgentError(f"cannot open the guest agent port {requests}: {exc}") from exc
        loop = asyncio.get_running_loop()
        try:
            await _lock(request_fd, timeout, requests)
            # (gone if a new QEMU's launch is replacing them: a restore racing us)
            reply_fd = os.open(replies, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            os.close(request_fd)
            raise AgentError(f"cannot open the guest agent port {replies}: {exc}") from exc
        except BaseException:
            os.close(request_fd)
            raise
        # (wrapping descriptors opened non-blocking above: nothing here blocks)
        reply_file, request_file = os.fdopen(reply_fd, "rb", 0), os.fdopen(request_fd, "wb", 0)
        reader = asyncio.StreamReader(limit=READ_LIMIT)
        try:
            read_side, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), reply_file)
        except BaseException:
            reply_file.close()
            request_file.close()
            raise
        try:
            transport, protocol = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, request_file)
        except BaseException:
            read_side.close()
            request_file.close()
            raise
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return cls(reader, writer, read_side)

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, path: Path, timeout: float = 5.0) -> AsyncIterator[GuestAgent]:
        agent = await cls._open(path, timeout)
        try:
            await agent.sync(timeout)
            yield agent
        finally:
            await agent.close()

    @classmethod
    @contextlib.asynccontextmanager
    async def attached(cls, path: Path, timeout: float = 0.25
                       ) -> AsyncIterator[GuestAgent | None]:
        """Best effort: a synced connection held for the block (None if the agent does not
        answer in time): the agent takes one client at a time, and the block has it.
        (On a QEMU with the socket port, held across a save, it also keeps qemu-ga out of
        its 100 ms reconnect sleeps after the restore: docs/design.md.)"""
        agent = await cls.attach_early(path, timeout)
        if agent is not None:
            try:
                await agent.sync(timeout)
            except AgentError:
                await agent.close()
                agent = None
        try:
            yield agent
        finally:
            if agent is not None:
                await agent.close()

    @classmethod
    async def attach_early(cls, path: Path, timeout: float = 1.0) -> GuestAgent | None:
        """Connect to a QEMU that has not loaded the guest yet (no sync: nobody answers
        before the guest runs); hand the result to `wait_ready`. None if it fails."""
        try:
            return await cls._open(path, timeout)
        except AgentError:
            return None

    async def close(self) -> None:
        self._writer.close()
        if self._read_side is not None:
            self._read_side.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    @classmethod
    async def ready(cls, path: Path, timeout: float,
                    early: GuestAgent | None = None) -> GuestAgent:
        """A connection on which the agent has answered guest-sync (`early` first, if
        given); the caller closes it. Handing it on saves the next user a reconnect (on a
        socket port, after which qemu-ga would be back in its 100 ms retry sleeps)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        if early is not None:
            try:
                await early.sync(timeout)
                return early
            except AgentError as exc:
                last = exc
                await early.close()
        while time.monotonic() < deadline:
            try:
                agent = await cls._open(path, min(1.0, deadline - time.monotonic()))
            except AgentError as exc:
                last = exc
            else:
                try:
                    await agent.sync(min(1.0, max(deadline - time.monotonic(), 0.01)))
                    return agent
                except AgentError as exc:
                    last = exc
                    await agent.close()
            _raise_if_cancelled()
            await asyncio.sleep(0.05)
        raise AgentError(f"guest agent did not answer within {timeout:.0f} s ({last})")

    @classmethod
    async def wait_ready(cls, path: Path, timeout: float) -> float:
        """Until the agent answers guest-sync; the seconds it took."""
        start = time.monotonic()
        agent = await cls.ready(path, timeout)
        await agent.close()
        return time.monotonic() - start

    @staticmethod
    def _request(command: str, arguments: dict[str, Any] | None = None) -> bytes:
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        return json.dumps(message).encode() + b"\n"

    async def _send(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        self._writer.write(self._request(command, arguments))
        await self._writer.drain()

    async def _read_message(self) -> dict[str, Any]:
        while True:
            line = await self._reader.readline()
            if not line:
                raise AgentError("guest agent closed the connection")
            line = line.strip(DELIMITER + b" \r\n")
            if line:
                result: dict[str, Any] = json.loads(line)
                return result

    def send_sync(self) -> int:
        """Put a guest-sync on its way now (e.g. before the guest runs); the next `sync`
        waits for its answer instead of sending another."""
        self._sent_sync = random.randrange(1, 2**31)
        # 0xFF first: qemu-ga drops what an earlier client left half-sent (its schema
        # asks clients to do this), which would otherwise swallow our request.
        self._writer.write(DELIMITER + self._request("guest-sync-delimited",
                                                     {"id": self._sent_sync}))
        return self._sent_sync

    async def sync(self, timeout: float = 5.0) -> None:
        try:
            token = self._sent_sync or self.send_sync()
            self._sent_sync = None
            async with asyncio.timeout(timeout):  # not wait_for: see hypervisor/qmp.py
                await self._await_sync(token)
        except TimeoutError as exc:
            raise AgentError(f"guest agent did not answer guest-sync within {timeout} s") from exc
        except _TRANSPORT_ERRORS as exc:
            raise AgentError(f"guest agent channel failed during guest-sync: {exc!r}") from exc

    async def _await_sync(self, token: int) -> None:
        await self._writer.drain()
        while True:
            # Skip everything up to the delimiter the agent puts before its reply.
            await self._reader.readuntil(DELIMITER)
            with contextlib.suppress(ValueError):
                reply = await self._read_message()
                if reply.get("return") == token:
                    return

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = 10.0) -> Any:
        try:
            await self._send(command, arguments)
            async with asyncio.timeout(timeout):
                reply = await self._read_message()
        except TimeoutError as exc:
            raise AgentError(f"guest agent: {command} timed out after {timeout} s") from exc
        except _TRANSPORT_ERRORS as exc:
            raise AgentError(f"guest agent channel failed during {command}: {exc!r}") from exc
        if "error" in reply:
            raise AgentError(f"guest agent: {command} failed: {reply['error'].get('desc')}")
        return reply.get("return")

    async def ping(self, timeout: float = 5.0) -> None:
        await self.execute("guest-ping", timeout=timeout)

    async def get_time(self) -> int:
        """The guest's wall clock, in nanoseconds since the epoch."""
        return int(await self.execute("guest-get-time"))

    async def set_time(self, time_ns: int, timeout: float = 10.0) -> None:
        """Set the guest's wall clock (qemu-ga then writes the RTC with /sbin/hwclock)."""
        await self.execute("guest-set-time", {"time": time_ns}, timeout=timeout)

    async def shutdown(self) -> None:
        """Ask the guest to power off. The agent sends no reply on success."""
        try:
            await self._send("guest-shutdown", {"mode": "powerdown"})
        except _TRANSPORT_ERRORS as exc:
            raise AgentError(f"guest agent channel failed during guest-shutdown: {exc!r}") from exc

    async def exec(self, argv: list[str], *, input: bytes | None = None,
                   timeout: float = 60.0) -> ExecResult:
        if not argv:
            raise AgentError("nothing to execute")
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
        try:
            pid = (await self.execute("guest-exec", args))["pid"]
        except AgentError as exc:
            not_started = _not_started(argv[0], exc.message)
            if not_started is None:
                raise
            return not_started
        started = time.monotonic()
        deadline = started + timeout
        delay = 0.005
        while True:
            status = await self.execute("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                return ExecResult(
                    exit_code=int(status.get("exitcode", -1)),
                    stdout=base64.b64decode(status.get("out-data", "")),
                    stderr=base64.b64decode(status.get("err-data", "")),
                    signal=status.get("signal"),
                    truncated=bool(status.get("out-truncated") or status.get("err-truncated")),
                )
            if time.monotonic() > deadline:
                raise AgentError(f"guest command {argv[0]} still running after {timeout:.0f} s")
            await asyncio.sleep(delay)
            # Short commands (a fork's identity, a probe) are polled every 20 ms: doubling
            # up to 100 ms noticed a 160 ms command at 255 ms. Long ones back off.
            cap = EXEC_POLL_SHORT if time.monotonic() - started < EXEC_SHORT else EXEC_POLL_LONG
            delay = min(delay * 2, cap)

    async def read_file(self, path: str, chunk: int = 1 << 20) -> bytes:
        handle = await self.execute("guest-file-open", {"path": path, "mode": "r"})
        try:
            data = bytearray()
            while True:
                part = await self.execute("guest-file-read", {"handle": handle, "count": chunk})
                data += base64.b64decode(part.get("buf-b64", ""))
                if part.get("eof"):
                    return bytes(data)
        finally:
            await self.execute("guest-file-close", {"handle": handle})

    async def write_file(self, path: str, data: bytes, chunk: int = 1 << 20) -> None:
        handle = await self.execute("guest-file-open", {"path": path, "mode": "w"})
        try:
            for offset in range(0, len(data), chunk):
                piece = base64.b64encode(data[offset : offset + chunk]).decode()
                await self.execute("guest-file-write", {"handle": handle, "buf-b64": piece})
            await self.execute("guest-file-flush", {"handle": handle})
        finally:
            await self.execute("guest-file-close", {"handle": handle})
