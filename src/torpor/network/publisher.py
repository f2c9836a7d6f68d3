"""Published ports: a relay that accepts on the host's ports and relays each connection
to where the port's target is now. The program that runs it, detached, per instance is
`python -m torpor.api.relay` (it adds the daemon as the waker).

The targets are a JSON file {KEY: [HOST, PORT]}, read again when it changes: a bridged
guest's address and port (fixed), or, in user mode, the loopback port QEMU's `hostfwd`
listens on (new at each QEMU start). Why a relay of torpor's own rather than a DNAT rule
or a `hostfwd` on the published port itself: it holds the listening sockets while the
VM is in standby (they are bound by whoever starts it and handed over, so a port in use
is the starter's error, at once), so every connection to a published port is seen by
torpor whatever the network mode: what waking a sleeping VM on traffic builds on. It
outlives QEMU across standby, like the TAP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

CHUNK = 256 << 10
CONNECT_TIMEOUT = 10.0
SLEEP_CHECK = 0.05  # while a connect is pending: how often to look whether the VM sleeps
AWAKE_CHECK = 0.005  # while a wake runs: how often to look whether the guest runs again


class Targets:
    """The targets file, parsed again only when its mtime changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._targets: dict[str, tuple[str, int]] = {}

    def get(self, key: str) -> tuple[str, int] | None:
        with contextlib.suppress(OSError, ValueError):
            info = self.path.stat()  # replaced by rename: a new inode
            stamp = (info.st_ino, info.st_mtime_ns)
            if stamp != self._stamp:
                raw = json.loads(self.path.read_text())
                self._targets = {k: (str(v[0]), int(v[1])) for k, v in raw.items()}
                self._stamp = stamp
        return self._targets.get(key)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


class WakeFailed(Exception):
    def __init__(self, generation: int, error: str) -> None:
        super().__init__(error)
        self.generation = generation
        self.error = error


class Waker:
    """Wakes the instance when a connection arrives while it sleeps: one call of
    `ask_wake` (in a thread) however many connections wait for it. Also keeps the
    activity file an idle clock reads, and tells each wake's time once."""

    def __init__(self, standby_dir: Path, activity_file: Path, ask_wake: Callable[[], None],
                 tell_wake: Callable[[bool, float, str | None], None]) -> None:
        self.standby_dir = standby_dir
        self.activity_file = activity_file
        self._ask_wake = ask_wake  # blocking: returns once the instance runs, else raises
        self._tell_wake = tell_wake  # blocking: (ok, seconds, error) to whoever counts
        self._wake: asyncio.Future[None] | None = None
        self.generation = 0  # wakes so far: each is reported once
        self._reported = 0
        self.open = 0
        self.held = 0
        self._write()

    def asleep(self) -> bool:
        """The instance has a standby state: in standby, or a standby or restore is
        under way (restore sets the state aside just before the guest runs again)."""
        return self.standby_dir.exists()

    def _write(self) -> None:
        from torpor.network.activity import Activity, write_activity

        with contextlib.suppress(OSError):
            write_activity(self.activity_file,
                           Activity(open=self.open, held=self.held, changed=time.time()))

    def opened(self, delta: int) -> None:
        self.open += delta
        self._write()

    async def wake(self) -> int:
        """Until the instance runs again (WakeFailed if it cannot); the wake's
        generation."""
        if self._wake is None or self._wake.done():
            self.generation += 1
            # Shared by every connection waiting for it, and never cancelled by one that
            # leaves (asyncio.wait): this relay imports nothing of torpor's (it starts fast).
            self._wake = asyncio.ensure_future(asyncio.to_thread(self._ask_wake))  # noqa: TID251
        generation, wake = self.generation, self._wake
        self.held += 1
        self._write()
        try:
            # Go on as soon as the restore sets the standby state aside, just before the
            # guest runs again: the guest's network answers from then on, while the wake
            # call still waits for its agent and the restore's last steps.
            while not wake.done() and self.asleep():
                await asyncio.wait({wake}, timeout=AWAKE_CHECK)
            if wake.done():
                wake.result()
        except Exception as exc:
            raise WakeFailed(generation, f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.held -= 1
            self._write()
        return generation

    def report(self, generation: int, started: float, error: str | None = None) -> None:
        """The wake's time (accept → connected to the guest) or its error, once."""
        if generation <= self._reported:
            return
        self._reported = generation
        seconds = time.monotonic() - started

        def send() -> None:
            with contextlib.suppress(Exception):  # whoever counts may be gone
                self._tell_wake(error is None, seconds, error)
        asyncio.get_running_loop().run_in_executor(None, send)


async def _connect(target_of: Callable[[], tuple[str, int] | None], waker: Waker | None,
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A connection to the guest, waking it first if it sleeps, and again if it goes to
    sleep while we connect (a standby that was under way). Returns the wake's
    generation (0: no wake was needed)."""
    generation = 0
    if waker is not None and waker.asleep():
        generation = await waker.wake()
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        target = target_of()
        if target is None:
            raise ConnectionRefusedError
        connecting = asyncio.ensure_future(asyncio.open_connection(*target))
        while not connecting.done():
            await asyncio.wait({connecting}, timeout=SLEEP_CHECK)
            if connecting.done():
                break
            if time.monotonic() > deadline:
                connecting.cancel()
                raise TimeoutError
            if waker is not None and waker.asleep():
                connecting.cancel()  # the target changes with the restore (user mode)
                generation = await waker.wake()
                break
        if connecting.done() and not connecting.cancelled():
            reader, writer = connecting.result()
            return reader, writer, generation


async def _relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                 target_of: Callable[[], tuple[str, int] | None], waker: Waker | None) -> None:
    accepted = time.monotonic()
    if waker is not None:
        waker.opened(+1)
    generation = 0
    try:
        try:
            guest_reader, guest_writer, generation = await _connect(target_of, waker)
        except WakeFailed as failed:  # the held connections are closed, the error told
            assert waker is not None
            waker.report(failed.generation, accepted, failed.error)
            client_writer.close()
            return
        except (OSError, TimeoutError):
            client_writer.close()
            return
        if waker is not None and generation:
            waker.report(generation, accepted)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_pipe(client_reader, guest_writer))
                group.create_task(_pipe(guest_reader, client_writer))
        finally:
            for writer in (client_writer, guest_writer):
                writer.close()
    finally:
        if waker is not None:
            waker.opened(-1)


async def serve(listeners: list[tuple[socket.socket, str]], targets: Targets,
                waker: Waker | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    servers = []
    for sock, key in listeners:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                         key: str = key) -> None:
            await _relay(r, w, lambda: targets.get(key), waker)
        servers.append(await asyncio.start_server(handle, sock=sock))
    await stop.wait()
    for server in servers:
        server.close()


def parse_listen(text: str) -> tuple[socket.socket, str]:
    fd, _, key = text.partition("=")
    sock = socket.socket(fileno=int(fd))
    sock.setblocking(False)
    return sock, key
