"""Sleep when idle, wake on traffic: a daemon in the test's own network namespace, real
guests serving HTTP on a published port, clients in the namespace. The daemon's socket
is a file, so the test reaches its API from outside the namespace too."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.network.conftest import Namespace

pytestmark = pytest.mark.qemu
STARTUP_TIMEOUT = 30.0
GET = ("import sys, urllib.request; print(urllib.request.urlopen("
       "'http://127.0.0.1:{port}/', timeout=120).read().decode(), end='')")


@dataclass
class NamespaceDaemon:
    netns: Namespace
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.netns.data_root / "torpord.sock"

    def start(self, **env: str) -> None:
        log = open(self.netns.data_root / "torpord.log", "ab")  # noqa: SIM115 - its lifetime
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.netns.name, sys.executable, "-m", "torpor.cli.main",
             "serve"], stdout=log, stderr=log,
            env=dict(os.environ, TORPOR_DATA_ROOT=str(self.netns.data_root), **env))
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert self.process.poll() is None, self.log()
            try:
                if self.api().get("/healthz").status_code == 200:
                    return
            except (httpx.TransportError, OSError):
                pass
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        self.process = None

    def log(self) -> str:
        return (self.netns.data_root / "torpord.log").read_text()

    def api(self) -> httpx.Client:
        token_file = self.netns.data_root / "api-token"
        token = token_file.read_text().strip() if token_file.exists() else ""
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                            base_url="http://torpord", timeout=300,
                            headers={"Authorization": f"Bearer {token}"})

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The CLI in the namespace, through the daemon (no --local)."""
        return self.netns.run(sys.executable, "-m", "torpor.cli.main", *args, check=check)

    def wait_state(self, name: str, state: str, timeout: float = 120) -> None:
        with self.api() as api:
            answer = api.get(f"/instances/{name}/wait", params={"state": state,
                                                                 "timeout": timeout})
            assert answer.status_code == 200, (answer.text, self.log())

    def state(self, name: str) -> str:
        with self.api() as api:
            return str(api.get(f"/instances/{name}").json()["state"])

    def operations(self, name: str) -> list[dict[str, object]]:
        with self.api() as api:
            ops: list[dict[str, object]] = api.get("/operations",
                                                   params={"instance": name}).json()
            return ops

    def settled(self, name: str, timeout: float = 120) -> None:
        """Until no operation on `name` runs: a woken guest answers before its restore
        has finished its last steps (the agent, the bookkeeping)."""
        deadline = time.monotonic() + timeout
        while any(op["state"] == "running" for op in self.operations(name)):
            assert time.monotonic() < deadline, self.operations(name)
            time.sleep(0.05)

    def wait_metric(self, line_start: str, value: float, timeout: float = 30) -> None:
        """Until the sample reads `value` (a relay reports its wake after it forwards)."""
        deadline = time.monotonic() + timeout
        while (seen := self.metric(line_start)) != value:
            assert seen < value and time.monotonic() < deadline, (line_start, seen, value)
            time.sleep(0.05)

    def metric(self, line_start: str) -> float:
        """A sample of /metrics; the metric must be there (no silent zero)."""
        with self.api() as api:
            text = api.get("/metrics").text
        for line in text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{line_start} not in /metrics")


@pytest.fixture
def daemon(netns: Namespace) -> Iterator[NamespaceDaemon]:
    served = NamespaceDaemon(netns)
    served.start()
    try:
        yield served
    finally:
        served.stop()


def serving_guest(daemon: NamespaceDaemon, name: str, port: int, *extra: str) -> None:
    daemon.cli("create", name, "--network", "bridge", "--publish", f"{port}:8080", *extra)
    daemon.cli("start", name)
    daemon.netns.serve(name, f"i-am-{name}")


def get(netns: Namespace, port: int) -> str:
    return netns.run(sys.executable, "-c", GET.format(port=port)).stdout


def triggered(ops: list[dict[str, object]], kind: str, trigger: str) -> list[dict[str, object]]:
    return [op for op in ops if op["kind"] == kind and op["trigger"] == trigger]


def test_an_idle_guest_sleeps_by_itself_and_a_request_wakes_it_across_a_restart(
        netns: Namespace, daemon: NamespaceDaemon) -> None:
    serving_guest(daemon, "w", 18080)
    assert get(netns, 18080) == "i-am-w\n"
    daemon.cli("policy", "w", "--auto-standby", "5s")
    daemon.wait_state("w", "standby")
    assert len(triggered(daemon.operations("w"), "standby", "idle")) == 1
    assert daemon.metric("torpor_auto_standby_total") == 1
    assert get(netns, 18080) == "i-am-w\n"  # the first request wakes it and is served
    daemon.settled("w")
    assert daemon.state("w") == "running"
    (wake,) = triggered(daemon.operations("w"), "restore", "traffic")
    assert wake["state"] == "succeeded"
    daemon.wait_metric('torpor_wakes_total{result="ok"}', 1)
    assert daemon.metric("torpor_wake_seconds_count") == 1
    # A restarted daemon keeps the policy, and the sleeping guest still wakes.
    daemon.wait_state("w", "standby")
    daemon.stop()
    daemon.start()
    with daemon.api() as api:
        assert api.get("/instances/w").json()["auto_standby"] == 5.0
    assert get(netns, 18080) == "i-am-w\n"
    daemon.settled("w")
    assert len(triggered(daemon.operations("w"), "restore", "traffic")) == 1


def test_a_burst_of_requests_to_a_sleeping_guest_is_served_by_one_restore(
        netns: Namespace, daemon: NamespaceDaemon) -> None:
    serving_guest(daemon, "b", 18081)
    daemon.cli("standby", "b")
    before = daemon.metric('torpor_wakes_total{result="ok"}')
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: get(netns, 18081), range(10)))
    assert answers == ["i-am-b\n"] * 10
    daemon.settled("b")
    assert len(triggered(daemon.operations("b"), "restore", "traffic")) == 1
    daemon.wait_metric('torpor_wakes_total{result="ok"}', before + 1)


HOLD_OPEN = """
import socket, sys
c = socket.create_connection(("127.0.0.1", 18083), timeout=300)
print("open", flush=True)
sys.stdin.read()
"""


def test_a_hold_an_open_connection_or_a_busy_cpu_keeps_a_guest_awake(
        netns: Namespace, daemon: NamespaceDaemon) -> None:
    """The held, the connected and the busy guest are set up before the control and get
    the same policy: when the control goes to sleep they have been idle longer, by the
    clock."""
    serving_guest(daemon, "held", 18082)
    serving_guest(daemon, "conn", 18083)
    serving_guest(daemon, "busy", 18086)
    netns.sh("busy", "(while :; do :; done) </dev/null >/dev/null 2>&1 & echo $! > /tmp/loop")
    daemon.cli("hold", "held", "--for", "10m")
    client = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c",
                               HOLD_OPEN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert client.stdout is not None and client.stdout.readline() == "open\n"
        serving_guest(daemon, "control", 18084)
        for name in ("held", "conn", "busy", "control"):
            daemon.cli("policy", name, "--auto-standby", "3s")
        daemon.wait_state("control", "standby")
        # The round of the idle clock that put the control to sleep looked at the others
        # too, and an auto-standby is an operation from its first moment.
        for name in ("held", "conn", "busy"):
            assert triggered(daemon.operations(name), "standby", "idle") == []
            assert daemon.state(name) == "running"
        daemon.cli("release", "held")
        daemon.wait_state("held", "standby")
        netns.sh("busy", "kill $(cat /tmp/loop)")
        daemon.wait_state("busy", "standby")
    finally:
        client.kill()
        client.wait()
    daemon.wait_state("conn", "standby")  # its connection closed: now it is idle


def test_a_wake_whose_restore_fails_closes_the_connection_and_stays_restorable(
        netns: Namespace, daemon: NamespaceDaemon) -> None:
    serving_guest(daemon, "f", 18085)
    daemon.cli("standby", "f")
    daemon.stop()
    daemon.start(TORPOR_FAULTS="restore.loaded=error")
    failed = netns.run(sys.executable, "-c", GET.format(port=18085), check=False)
    assert failed.returncode != 0
    assert "RemoteDisconnected" in failed.stderr or "ConnectionResetError" in failed.stderr, \
        failed.stderr
    daemon.settled("f")
    (wake,) = triggered(daemon.operations("f"), "restore", "traffic")
    assert wake["state"] == "failed" and "injected fault" in str(wake["error"])
    daemon.wait_metric('torpor_wakes_total{result="error"}', 1)
    assert daemon.state("f") == "standby"
    daemon.stop()
    daemon.start()
    assert get(netns, 18085) == "i-am-f\n"  # the next request wakes it after all
