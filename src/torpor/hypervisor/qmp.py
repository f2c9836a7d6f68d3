"""QMP through the qemu.qmp library, with timeouts and readable errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError
from qemu.qmp.qmp_client import GreetingError, NegotiationError

from torpor.errors import OperationFailed

log = logging.getLogger(__name__)
# qemu.qmp logs every disconnect at WARNING/ERROR; those are expected here.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

RUNNING_STATES = {"running"}
PAUSED_STATES = {"paused", "prelaunch", "inmigrate", "postmigrate", "finish-migrate",
                 "save-vm", "restore-vm", "suspended", "debug", "colo"}
FAILED_STATES = {"internal-error", "io-error", "guest-panicked", "shutdown", "watchdog"}


NOT_FINALIZED = "Migration is not finalized yet"  # qmp_cont in finish-migrate
FINISH_MIGRATE_GRACE = 5.0
SESSION_ATTEMPTS = 5  # see _session


class QmpError(OperationFailed):
    pass


class Monitor:
    """One QMP connection. Use `async with Monitor.connect(path) as mon:`."""

    def __init__(self, client: QMPClient, path: Path) -> None:
        self._client = client
        self.path = path

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, path: Path, timeout: float = 5.0) -> AsyncIterator[Monitor]:
        # Timeouts by asyncio.timeout, never asyncio.wait_for: on Python 3.11, wait_for
        # whose awaitable ends as the caller is cancelled returns its result and loses the
        # cancellation (CPython gh-86296, fixed in 3.12): a Ctrl-C in a QMP poll let a
        # standby run on.
        try:
            async with asyncio.timeout(timeout):
                client = await _session(path)
        except TimeoutError as exc:
            raise QmpError(f"QEMU's monitor at {path} did not answer within {timeout:g} s"
                           ) from exc
        except (ConnectError, OSError) as exc:
            raise QmpError(f"cannot reach QEMU's monitor at {path}: {exc}") from exc
        try:
            yield cls(client, path)
        finally:
            with contextlib.suppress(Exception):
                await client.disconnect()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> Any:
        try:
            async with asyncio.timeout(timeout):
                return await self._client.execute(command, arguments)
        except ExecuteError as exc:
            raise QmpError(f"QMP {command} failed: {exc}") from exc
        except TimeoutError as exc:
            raise QmpError(f"QMP {command} did not answer within {timeout:.0f} s") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise QmpError(f"QMP {command}: connection to QEMU lost ({exc})") from exc

    async def status(self) -> str:
        result = await self.execute("query-status")
        return str(result["status"])

    async def pause(self) -> None:
        await self.execute("stop")

    async def resume(self) -> None:
        """`cont`. Right after a migration completed (its MIGRATION event) QEMU may still
        be in finish-migrate for a moment and refuse; that is retried, briefly."""
        deadline = time.monotonic() + FINISH_MIGRATE_GRACE
        while True:
            try:
                await self.execute("cont")
                return
            except QmpError as exc:
                if NOT_FINALIZED not in str(exc) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.001)

    async def quit(self) -> None:
        """Ask QEMU to exit; the connection drops as it does, which is not an error."""
        with contextlib.suppress(QmpError):
            await self.execute("quit", timeout=5.0)

    async def send_fd(self, name: str, fd: int) -> None:
        """Pass a file descriptor to QEMU under `name` (QMP getfd)."""
        self._client.send_fd_scm(fd)
        await self.execute("getfd", {"fdname": name})

    async def hand_over_fd(self, name: str, fd: int) -> None:
        """send_fd, then close our copy: a pipe end we kept open would hide EOF."""
        try:
            await self.send_fd(name, fd)
        finally:
            os.close(fd)

    async def set_migration_parameters(self, **params: Any) -> None:
        await self.execute("migrate-set-parameters",
                           {k.replace("_", "-"): v for k, v in params.items()})

    async def set_migration_capabilities(self, **caps: bool) -> None:
        await self.execute("migrate-set-capabilities", {
            "capabilities": [{"capability": k.replace("_", "-"), "state": v}
                             for k, v in caps.items()]
        })

    @contextlib.contextmanager
    def migration_events(self) -> Iterator[MigrationEvents]:
        """QEMU's MIGRATION events (status changes) while the block runs: a wait on a
        migration wakes the moment it changes instead of at its next poll. QEMU sends them
        once the `events` capability is on (prepare_outgoing)."""
        with self._client.listener("MIGRATION") as listener:
            yield MigrationEvents(listener)

    @contextlib.contextmanager
    def stop_events(self) -> Iterator[StopEvents]:
        """QEMU's STOP events (the VM stopped: its vCPUs are paused) while the block runs."""
        with self._client.listener("STOP") as listener:
            yield StopEvents(listener)

    async def query_migrate(self) -> dict[str, Any]:
        result = await self.execute("query-migrate")
        return dict(result)

    async def version(self) -> str:
        """QEMU's version, from its greeting (no round trip) when the library kept it."""
        greeting = self._client.greeting
        version: Any = (greeting.QMP.version if greeting is not None
                        else await self.execute("query-version"))
        v = version["qemu"]
        return f"{v['major']}.{v['minor']}.{v['micro']}"


async def _session(path: Path) -> QMPClient:
    """A negotiated session. QEMU 7.2 can send a new client an event before its greeting
    or before the answer to qmp_capabilities: a monitor whose last client had negotiated
    still counts as one that takes events until the new client's connection is set up
    (the main loop emits, the monitor's I/O thread accepts). qemu.qmp then fails the
    session (GreetingError, NegotiationError); nothing has been asked of QEMU yet, so
    another session is opened. Seen in CI as a snapshot's "Negotiation failed" right after
    a restore; bench/qmp_race.py reproduces it with STOP/RESUME events from other
    monitors (6 sessions in 13,000 fail with qemu.qmp alone, none here)."""
    attempts_left = SESSION_ATTEMPTS
    while True:
        client = QMPClient(path.name)
        try:
            await client.connect(str(path))
            return client
        except ConnectError as exc:
            await client.disconnect()
            attempts_left -= 1
            if not attempts_left or not isinstance(exc.exc, (GreetingError, NegotiationError)):
                raise
            log.debug("%s: an event raced the QMP greeting (%s); connecting again", path, exc)


class StopEvents:
    """A STOP event listener (Monitor.stop_events)."""

    def __init__(self, listener: EventListener) -> None:
        self._listener = listener
        self._last: float | None = None

    def stopped_at(self) -> float | None:
        """When QEMU last reported the VM stopped, among the events received so far
        (seconds since the epoch, QEMU's own timestamp), or None."""
        for event in self._listener.clear():
            stamp = event.get("timestamp")
            if isinstance(stamp, dict):
                self._last = int(stamp["seconds"]) + int(stamp["microseconds"]) / 1e6
        return self._last


class MigrationEvents:
    """A MIGRATION event listener (Monitor.migration_events)."""

    def __init__(self, listener: EventListener) -> None:
        self._listener = listener

    async def next_or_timeout(self, timeout: float) -> str | None:
        """Until the next status change (its status), or `timeout` seconds (None)."""
        try:
            async with asyncio.timeout(timeout):
                event = await self._listener.get()
        except TimeoutError:
            return None
        data = event.get("data")
        return str(data.get("status", "")) or None if isinstance(data, dict) else None
