"""Published ports: a small detached program that accepts on the host's ports and relays
each connection to where the port's target is now.

    python -m torpor.network.publisher --lock-fd N --ready-fd N --identity FILE \
        --targets FILE --listen FD=KEY [--listen ...]

`--targets` is a JSON file {KEY: [HOST, PORT]}, read again when it changes: a bridged
guest's address and port (fixed), or, in user mode, the loopback port QEMU's `hostfwd`
listens on (new at each QEMU start). Why a relay of torpor's own rather than a DNAT rule
or a `hostfwd` on the published port itself: it holds the listening sockets while the
VM is in standby (they are bound by whoever starts it and handed over, so a port in use
is the starter's error, at once), so every connection to a published port is seen by
torpor whatever the network mode: what waking a sleeping VM on traffic builds on. It
outlives QEMU across standby, like the TAP. The starter's lock descriptor is inherited:
the relay runs as long as the lock is held. It writes its identity, then one byte to
`--ready-fd`: the starter returns only then, so a stop right after finds it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
from pathlib import Path

CHUNK = 256 << 10
CONNECT_TIMEOUT = 10.0


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


async def _relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                 target: tuple[str, int] | None) -> None:
    try:
        if target is None:
            raise ConnectionRefusedError
        guest_reader, guest_writer = await asyncio.wait_for(
            asyncio.open_connection(*target), CONNECT_TIMEOUT)
    except (OSError, TimeoutError):
        client_writer.close()
        return
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(_pipe(client_reader, guest_writer))
            group.create_task(_pipe(guest_reader, client_writer))
    finally:
        for writer in (client_writer, guest_writer):
            writer.close()


async def serve(listeners: list[tuple[socket.socket, str]], targets: Targets) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    servers = []
    for sock, key in listeners:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                         key: str = key) -> None:
            await _relay(r, w, targets.get(key))
        servers.append(await asyncio.start_server(handle, sock=sock))
    await stop.wait()
    for server in servers:
        server.close()


def parse_listen(text: str) -> tuple[socket.socket, str]:
    fd, _, key = text.partition("=")
    sock = socket.socket(fileno=int(fd))
    sock.setblocking(False)
    return sock, key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lock-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--identity", type=Path, required=True)
    parser.add_argument("--targets", type=Path, required=True)
    parser.add_argument("--listen", action="append", default=[])
    args = parser.parse_args()
    from torpor.fsutil import atomic_write_json, read_proc_stat

    stat = read_proc_stat(os.getpid())
    atomic_write_json(args.identity, {"pid": os.getpid(),
                                      "start_time": stat[1] if stat else 0})
    os.write(args.ready_fd, b"1")
    os.close(args.ready_fd)
    asyncio.run(serve([parse_listen(item) for item in args.listen], Targets(args.targets)))
    args.identity.unlink(missing_ok=True)
    os.close(args.lock_fd)


if __name__ == "__main__":
    main()
