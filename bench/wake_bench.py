"""Wake on traffic: how long the first HTTP request to a sleeping guest waits.

    make bench-wake        (python -m bench.wake_bench [--sizes 512M,2G] [--runs 3])

Runs in a network namespace it creates (the network rule), with a daemon in it and a
bridged built-in guest per memory size and mode, serving with busybox httpd on a
published port. Tables:

1. Time to the first HTTP response (client's connect to the body read), medians of
   `--runs`: to the running guest; to the guest in standby (the relay holds the
   connection, the daemon restores, the relay forwards); that wake's own
   `restore_to_agent` phase (what a manual restore waits for), with the difference; and
   the same guest's `restore_to_agent` when no client waits (a manual restore).
   Bar: a sleeping memory-file guest answers within its restore_to_agent + 100 ms.
2. N concurrent first requests to a sleeping guest (memory-file, the smallest size):
   how long until the last was answered, and how many restores that took (1).
3. Throughput of a running guest through the published port against its address.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx

from bench.common import NS_ENV, in_namespace, remove_work
from torpor.units import parse_size


class Daemon:
    def __init__(self, root: Path) -> None:
        self.root = root
        log = open(root / "torpord.log", "ab")  # noqa: SIM115 - the daemon's lifetime
        self.process = subprocess.Popen([sys.executable, "-m", "torpor.cli.main", "serve"],
                                        env=dict(os.environ, TORPOR_DATA_ROOT=str(root)),
                                        stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.api().get("/healthz").status_code == 200:
                    return
            except (httpx.TransportError, OSError):
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit((root / "torpord.log").read_text())
            time.sleep(0.1)

    def api(self) -> httpx.Client:
        token = root_token(self.root)
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.root / "torpord.sock")),
                            base_url="http://torpord", timeout=600,
                            headers={"Authorization": f"Bearer {token}"})

    def call(self, method: str, path: str, **kw: Any) -> Any:
        with self.api() as api:
            answer = api.request(method, path, **kw)
            if answer.status_code >= 400:
                raise SystemExit(f"{method} {path}: {answer.text}")
            return answer.json() if answer.content else None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def root_token(root: Path) -> str:
    token = root / "api-token"
    return token.read_text().strip() if token.exists() else ""


def first_response(port: int) -> float:
    started = time.perf_counter()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=300).read()
    assert body == b"hello\n", body
    return time.perf_counter() - started


def send(host: str, port: int, total: int) -> float:
    block = b"\0" * (1 << 20)
    with socket.create_connection((host, port), timeout=60) as conn:
        started = time.perf_counter()
        for _ in range(total >> 20):
            conn.sendall(block)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
        return (total >> 20) / (time.perf_counter() - started)


def wakes(daemon: Daemon, name: str) -> int:
    ops = daemon.call("GET", "/operations", params={"instance": name})
    return sum(1 for op in ops if op["kind"] == "restore" and op["trigger"] == "traffic")


def settled(daemon: Daemon, name: str) -> None:
    """Until no operation on `name` runs (the wake's restore has recorded its phases)."""
    while any(op["state"] == "running"
              for op in daemon.call("GET", "/operations", params={"instance": name})):
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="512M,2G")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrent", default="10,50")
    args = parser.parse_args()
    if NS_ENV not in os.environ:
        return in_namespace("bench.wake_bench")
    work = Path(tempfile.mkdtemp(prefix="tpwb-", dir="/var/tmp"))
    daemon = Daemon(work)
    port = iter(range(18100, 18200))
    sizes = [parse_size(s, "M") for s in args.sizes.split(",")]

    def guest(name: str, memory: int, backing: str, guest_port: int = 8080) -> int:
        published = next(port)
        daemon.call("POST", "/instances", json={
            "name": name, "memory_mib": memory >> 20, "memory_backing": backing,
            "network": "bridge", "publish": [f"{published}:{guest_port}"]})
        daemon.call("POST", f"/instances/{name}/start")
        daemon.call("POST", f"/instances/{name}/exec", json={"argv": [
            "sh", "-c", "mkdir -p /tmp/w && echo hello > /tmp/w/index.html && "
            "httpd -p 8080 -h /tmp/w"]})
        return published

    try:
        print(f"\n## first HTTP response, ms (median of {args.runs})\n")
        print(f"{'guest':<18} {'running':>8} {'asleep':>8} {'restore_to_agent':>17} "
              f"{'asleep - restore':>17} {'restore alone':>14}")
        for memory in sizes:
            for backing in ("file", "anonymous"):
                name = f"w{memory >> 20}{backing[0]}"
                published = guest(name, memory, backing)
                running = statistics.median(first_response(published)
                                            for _ in range(args.runs))
                asleep, to_agent = [], []
                for _ in range(args.runs):
                    daemon.call("POST", f"/instances/{name}/standby")
                    asleep.append(first_response(published))
                    settled(daemon, name)  # the response may come before the restore ends
                    info = daemon.call("GET", f"/instances/{name}")
                    to_agent.append(info["last_operation"]["phases"]["restore_to_agent"])
                alone = []  # the same guest's restore_to_agent with no client waiting
                for _ in range(args.runs):
                    daemon.call("POST", f"/instances/{name}/standby")
                    info = daemon.call("POST", f"/instances/{name}/restore")
                    alone.append(info["last_operation"]["phases"]["restore_to_agent"])
                mode = "memory-file" if backing == "file" else "stream"
                a, r = statistics.median(asleep), statistics.median(to_agent)
                print(f"{f'{memory >> 20} MiB {mode}':<18} {running * 1e3:>8.1f} "
                      f"{a * 1e3:>8.1f} {r * 1e3:>17.1f} {(a - r) * 1e3:>17.1f} "
                      f"{statistics.median(alone) * 1e3:>14.1f}")
                daemon.call("DELETE", f"/instances/{name}", params={"force": True})

        print("\n## concurrent first requests to a sleeping guest "
              f"({sizes[0] >> 20} MiB memory-file)\n")
        print(f"{'clients':>8} {'last answered ms':>17} {'median ms':>10} {'restores':>9}")
        name = "burst"
        published = guest(name, sizes[0], "file")
        for count in (int(n) for n in args.concurrent.split(",")):
            daemon.call("POST", f"/instances/{name}/standby")
            before = wakes(daemon, name)
            with concurrent.futures.ThreadPoolExecutor(count) as pool:
                times = list(pool.map(lambda _: first_response(published), range(count)))
            settled(daemon, name)
            print(f"{count:>8} {max(times) * 1e3:>17.1f} {statistics.median(times) * 1e3:>10.1f}"
                  f" {wakes(daemon, name) - before:>9}")

        daemon.call("DELETE", f"/instances/{name}", params={"force": True})

        print("\n## a running guest: 64 MiB host → guest, MiB/s "
              f"(median of {args.runs})\n")
        published = guest("tput", sizes[0], "file", guest_port=5001)
        address = daemon.call("GET", "/instances/tput")["network"]["ip"]
        for label, host, target in (("guest address", address, 5001),
                                    ("published port", "127.0.0.1", published)):
            samples = []
            for _ in range(args.runs):
                daemon.call("POST", "/instances/tput/exec", json={"argv": [
                    "sh", "-c", "(nc -l -p 5001 >/dev/null </dev/null 2>&1 &); sleep 0.2"]})
                samples.append(send(host, target, 64 << 20))
            print(f"{label:<15} {statistics.median(samples):>8.1f}")
    finally:
        daemon.stop()
        remove_work(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
