"""QEMU's event-versus-greeting race on a QMP monitor, and what torpor's client does with it.

    python -m bench.qmp_race [--seconds 30] [--noise 4]

A QEMU 7.2 monitor whose last client had negotiated still counts as one that takes events
until the next client's connection is set up: an event the main loop emits meanwhile can
reach the new client before its greeting or before the answer to qmp_capabilities, and
qemu.qmp gives up on that session (GreetingError, NegotiationError). CI met it once as a
snapshot's "Negotiation failed" right after a restore (hypervisor/qmp.py `_session`).

Here one QEMU (no guest: `-S`, nothing to boot) has `--noise` extra monitors whose clients
run `cont`/`stop` in a loop (a RESUME and a STOP event to every monitor each), while a
client opens sessions on the first monitor one after the other for `--seconds`, each
asking `query-status`: first with qemu.qmp alone, then through torpor's Monitor.connect.
The table: sessions opened, sessions that failed, and (torpor) sessions opened again.
Only loopback Unix sockets; the QEMU is killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

from qemu.qmp import QMPClient

from torpor.hypervisor.qmp import Monitor


class _Retries(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "raced the QMP greeting" in record.getMessage()


async def _plain_session(path: Path) -> None:
    client = QMPClient("bench")
    try:
        await client.connect(str(path))
        await client.execute("query-status")
    finally:
        await client.disconnect()


async def _torpor_session(path: Path) -> None:
    async with Monitor.connect(path) as mon:
        await mon.status()


async def _sessions(path: Path, seconds: float,
                    session: Callable[[Path], Awaitable[None]]) -> tuple[int, Counter[str]]:
    failures: Counter[str] = Counter()
    opened, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            await session(path)
        except Exception as exc:  # counted by kind: the table says what failed
            failures[type(getattr(exc, "exc", exc)).__name__] += 1
        opened += 1
    return opened, failures


async def _noise(path: Path, stop: asyncio.Event) -> None:
    client = QMPClient("noise")
    await client.connect(str(path))
    try:
        while not stop.is_set():
            await client.execute("cont")
            await client.execute("stop")
    finally:
        await client.disconnect()


async def _run(work: Path, seconds: float, noise: int) -> list[tuple[str, int, str, str]]:
    sockets = [work / f"m{i}.sock" for i in range(noise + 1)]
    argv = ["qemu-system-x86_64", "-S", "-display", "none", "-nodefaults", "-machine", "q35",
            "-accel", "tcg"]
    for sock in sockets:
        argv += ["-qmp", f"unix:{sock},server=on,wait=off"]
    qemu = subprocess.Popen(argv)
    try:
        while not all(s.exists() for s in sockets):
            await asyncio.sleep(0.01)
        retries = _Retries()
        qmp_log = logging.getLogger("torpor.hypervisor.qmp")
        qmp_log.setLevel(logging.DEBUG)
        qmp_log.addHandler(retries)
        rows = []
        for name, session in (("qemu.qmp alone", _plain_session),
                              ("torpor Monitor.connect", _torpor_session)):
            stop = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                for sock in sockets[1:]:
                    group.create_task(_noise(sock, stop))
                opened, failures = await _sessions(sockets[0], seconds, session)
                stop.set()
            failed = ", ".join(f"{n} {kind}" for kind, n in failures.items()) or "0"
            again = str(retries.count) if session is _torpor_session else "-"
            rows.append((name, opened, failed, again))
        return rows
    finally:
        qemu.kill()
        qemu.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--noise", type=int, default=4, help="monitors sending events")
    args = parser.parse_args()
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="tp-qmprace-") as work:
        rows = asyncio.run(_run(Path(work), args.seconds, args.noise))
    print(f"{'client':24} {'sessions':>9}  {'failed':36} {'opened again':>12}")
    for name, opened, failed, again in rows:
        print(f"{name:24} {opened:>9}  {failed:36} {again:>12}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
