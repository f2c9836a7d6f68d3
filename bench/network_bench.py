"""Bridged networking: throughput, the stall of a connection across standby/restore, and
what the bridge adds to create/start/fork.

    make bench-network        (python -m bench.network_bench [--mib 128] [--runs 3])

The network rule: the script re-runs itself inside a network namespace it creates
(`ip netns add`), where torpor, its QEMUs and the clients live; the namespace goes
afterwards. Three tables:

1. TCP throughput host → guest (the built-in guest's busybox `nc` discarding what it
   reads): to a bridged guest's address directly and through its published port
   (torpor's relay); to a user-mode guest through QEMU's `hostfwd` itself and through
   its published port (the relay, then that `hostfwd`); same guest size, same run.
2. A client echoing a line every 20 ms across `standby` + `restore` (stream and
   memory-file mode): the longest gap between answers, and how long after `restore`
   returned the first answer came (TCP's retransmission backoff).
3. The bridge's setup: `create`, `start` and `fork` of a bridged guest against a
   user-mode one.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from bench.common import NS_ENV, in_namespace, remove_work


def send(host: str, port: int, total: int) -> float:
    """MiB/s of `total` bytes written to a discarding server (until it has read them all
    and closed)."""
    block = b"\0" * (1 << 20)
    with socket.create_connection((host, port), timeout=30) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        start = time.perf_counter()
        for _ in range(total >> 20):
            conn.sendall(block)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)  # the server closes once it read everything
        return (total >> 20) / (time.perf_counter() - start)


def echo(ip: str, answers: list[float], stop: threading.Event) -> None:
    """One byte there and back every 20 ms; when each answer came."""
    with socket.create_connection((ip, 7000), timeout=60) as conn:
        while not stop.is_set():
            conn.sendall(b"x")
            conn.recv(1)
            answers.append(time.perf_counter())
            time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if NS_ENV not in os.environ:
        return in_namespace("bench.network_bench")
    from torpor.instances.context import Settings
    from torpor.manager import InstanceManager

    work = Path(tempfile.mkdtemp(prefix="tpnb-", dir="/tmp"))
    manager = InstanceManager(work / "data", Settings(accel="tcg"))
    run = asyncio.run

    def timed(coro: Coroutine[Any, Any, object]) -> float:
        started = time.perf_counter()
        run(coro)
        return time.perf_counter() - started

    def sh(name: str, script: str) -> str:
        return run(manager.exec(name, ["sh", "-c", script])).stdout.decode()

    def listen(name: str) -> None:
        sh(name, "(nc -l -p 5001 >/dev/null </dev/null 2>&1 &) ; sleep 0.2")

    try:
        run(manager.create("warmup"))  # untimed: the guest's boot files come in once
        run(manager.delete("warmup"))
        print("\n## setup: bridge against user mode (seconds)\n")
        print(f"{'network':<8} {'create':>7} {'start':>7} {'(spawn)':>8} {'fork':>7}")
        for mode in ("user", "bridge"):
            name = f"s-{mode}"
            create = timed(manager.create(name, network=mode))
            start = timed(manager.start(name))
            # start's spawn phase holds the bridge, firewall and TAP set-up (bridge mode)
            last = run(manager.get(name)).last_operation
            spawn = last.phases.get("spawn", 0.0) if last else 0.0
            fork = timed(manager.fork(name, f"{name}-f"))
            print(f"{mode:<8} {create:>7.3f} {start:>7.3f} {spawn:>8.3f} {fork:>7.3f}")
            for name in (f"s-{mode}-f", f"s-{mode}"):
                run(manager.delete(name, force=True))

        run(manager.create("tp", network="bridge", publish=["127.0.0.1:18080:5001"]))
        run(manager.create("tu", network="user", publish=["127.0.0.1:18090:5001"]))
        for name in ("tp", "tu"):
            run(manager.start(name))
        guest_ip = run(manager.get("tp")).network.ip  # type: ignore[union-attr]
        # user mode: the relay connects to a hostfwd on a loopback port of QEMU's
        targets = json.loads(manager.paths("tu").publisher_targets.read_text())
        hostfwd_port = int(targets["127.0.0.1:18090"][1])
        total = args.mib << 20
        print(f"\n## throughput host → guest, {args.mib} MiB, MiB/s (median of {args.runs})\n")
        rows = {"bridge: guest address": ("tp", str(guest_ip), 5001),
                "bridge: published": ("tp", "127.0.0.1", 18080),
                "user: hostfwd itself": ("tu", "127.0.0.1", hostfwd_port),
                "user: published": ("tu", "127.0.0.1", 18090)}
        results = {}
        for label, (name, host, port) in rows.items():
            samples = []
            for _ in range(args.runs):
                listen(name)
                samples.append(send(host, port, total))
            results[label] = statistics.median(samples)
        base = results["bridge: guest address"]
        for label, value in results.items():
            print(f"{label:<22} {value:>8.1f}  {value / base:>5.2f}x")
        for name in ("tp", "tu"):
            run(manager.delete(name, force=True))

        print("\n## a connection across standby + restore (echo every 20 ms)\n")
        print(f"{'mode':<10} {'standby':>8} {'restore':>8} {'longest gap':>12} "
              f"{'first answer after restore':>27}")
        for backing in ("anonymous", "file"):
            name = f"e-{backing}"
            run(manager.create(name, network="bridge", memory_backing=backing))
            run(manager.start(name))
            sh(name, "(nc -l -p 7000 -e cat </dev/null >/dev/null 2>&1 &) ; sleep 0.2")
            ip = str(run(manager.get(name)).network.ip)  # type: ignore[union-attr]
            answers: list[float] = []
            stop = threading.Event()
            client = threading.Thread(target=echo, args=(ip, answers, stop))
            client.start()
            time.sleep(0.5)
            t0 = time.perf_counter()
            run(manager.standby(name))
            t1 = time.perf_counter()
            run(manager.restore(name))
            t2 = time.perf_counter()
            time.sleep(3)
            stop.set()
            client.join()
            gap = max(b - a for a, b in itertools.pairwise(answers))
            first = min(a for a in answers if a > t2) - t2
            print(f"{backing:<10} {t1 - t0:>8.3f} {t2 - t1:>8.3f} {gap:>12.3f} {first:>27.3f}")
            run(manager.delete(name, force=True))
    finally:
        remove_work(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
