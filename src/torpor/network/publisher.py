"""Published ports of a bridged guest: a small detached program that accepts on the
host's ports and relays each connection to the guest's address.

    python -m torpor.network.publisher --lock-fd N --identity FILE \
        --listen FD=GUEST_IP:GUEST_PORT [--listen ...]

Why a relay of torpor's own rather than a DNAT rule: it holds the listening sockets
while the VM is in standby (they are bound by whoever starts it and handed over, so a
port in use is the starter's error, at once), so every connection to a published port
is seen by torpor: what waking a sleeping VM on traffic builds on. It outlives QEMU
across standby, like the TAP. The starter's lock descriptor is inherited: the relay runs
as long as the lock is held."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
from pathlib import Path

CHUNK = 256 << 10
CONNECT_TIMEOUT = 10.0


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
                 target: tuple[str, int]) -> None:
    try:
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


async def serve(listeners: list[tuple[socket.socket, tuple[str, int]]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    servers = []
    for sock, target in listeners:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                         target: tuple[str, int] = target) -> None:
            await _relay(r, w, target)
        servers.append(await asyncio.start_server(handle, sock=sock))
    await stop.wait()
    for server in servers:
        server.close()


def parse_listen(text: str) -> tuple[socket.socket, tuple[str, int]]:
    fd, _, target = text.partition("=")
    host, _, port = target.rpartition(":")
    sock = socket.socket(fileno=int(fd))
    sock.setblocking(False)
    return sock, (host, int(port))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lock-fd", type=int, required=True)
    parser.add_argument("--identity", type=Path, required=True)
    parser.add_argument("--listen", action="append", default=[])
    args = parser.parse_args()
    from torpor.fsutil import atomic_write_json, read_proc_stat

    stat = read_proc_stat(os.getpid())
    atomic_write_json(args.identity, {"pid": os.getpid(),
                                      "start_time": stat[1] if stat else 0})
    asyncio.run(serve([parse_listen(item) for item in args.listen]))
    args.identity.unlink(missing_ok=True)
    os.close(args.lock_fd)


if __name__ == "__main__":
    main()
