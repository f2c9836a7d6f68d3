"""Concurrency soak: 3 clients × 30 random operations on 3 guests through one daemon.

Afterwards every VM is running or restorable with its RAM and disk data, the API never
answered 500 (nor anything undocumented), every 409 was a real conflict, and the data
root is clean. Bounded: a seeded random sequence, a fixed number of operations.

A 409 is real when another client's operation on the same guest overlapped it in time
(busy, or a state that changed under it), or, with nothing overlapping, when the state
the guest was left in by the operations before it is one the refused operation does not
accept.
"""

from __future__ import annotations

import base64
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.api.conftest import Daemon
from tests.conftest import EMPTY_MD5, run
from torpor.manager import InstanceManager

pytestmark = pytest.mark.qemu
GUESTS = ("soak-a", "soak-b", "soak-c")
CLIENTS = 3
OPERATIONS = 30
SEED = 1729
DOCUMENTED = {200, 201, 204, 409}
# The states each operation refuses (what a 409 for a wrong state must have met).
REFUSES = {"standby": {"standby"}, "restore": {"running"}, "snapshot": set(), "exec": {"standby"}}


@dataclass
class Call:
    client: int
    guest: str
    op: str
    started: float
    ended: float
    status: int
    body: str


def request(api: httpx.Client, op: str, guest: str, index: int) -> httpx.Response:
    if op == "standby":
        return api.post(f"/instances/{guest}/standby")
    if op == "restore":
        return api.post(f"/instances/{guest}/restore")
    if op == "exec":
        return api.post(f"/instances/{guest}/exec", json={"argv": ["cat", "/run/counter"]})
    response = api.post(f"/instances/{guest}/snapshots", json={"name": f"s{index}"})
    if response.status_code == 201:
        api.delete(f"/snapshots/s{index}", params={"instance": guest})
    return response


def client_run(daemon: Daemon, client: int, calls: list[Call], lock: threading.Lock) -> None:
    rng = random.Random(SEED + client)
    with daemon.client() as api:
        for i in range(OPERATIONS):
            guest = rng.choice(GUESTS)
            op = rng.choice(("standby", "restore", "snapshot", "exec"))
            started = time.monotonic()
            response = request(api, op, guest, client * 1000 + i)
            ended = time.monotonic()
            with lock:
                calls.append(Call(client, guest, op, started, ended, response.status_code,
                                  response.text))


def plant(api: httpx.Client, guest: str) -> str:
    script = ("dd if=/dev/urandom of=/tmp/ram.bin bs=1M count=4 2>/dev/null;"
              " dd if=/dev/urandom of=/root/disk.bin bs=1M count=1 2>/dev/null; sync;"
              " md5sum /tmp/ram.bin /root/disk.bin")
    return guest_out(api, guest, script)


def guest_out(api: httpx.Client, guest: str, script: str) -> str:
    response = api.post(f"/instances/{guest}/exec", json={"argv": ["sh", "-c", script]})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    assert result["exit_code"] == 0
    return base64.b64decode(result["stdout_b64"]).decode()


@pytest.fixture(scope="module")
def guests(daemon: Daemon) -> Iterator[dict[str, str]]:
    with daemon.client() as api:
        def boot(name: str) -> None:
            assert api.post("/instances", json={"name": name, "memory_mib": 256}
                            ).status_code == 201
            assert api.post(f"/instances/{name}/start").status_code == 200

        threads = [threading.Thread(target=boot, args=(g,)) for g in GUESTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        marks = {g: plant(api, g) for g in GUESTS}
        assert all(EMPTY_MD5 not in m for m in marks.values())
        yield marks


def beside(calls: list[Call], call: Call) -> list[Call]:
    """Other clients' calls on the same guest that overlapped `call` in time."""
    return [other for other in calls
            if other is not call and other.guest == call.guest and other.client != call.client
            and other.started < call.ended and call.started < other.ended]


def state_before(calls: list[Call], call: Call) -> str:
    """The guest's state as the successful operations ended before `call` left it."""
    state = "running"
    for other in sorted(calls, key=lambda c: c.ended):
        if other.ended > call.started or other.guest != call.guest or other.status >= 300:
            continue
        state = {"standby": "standby", "restore": "running"}.get(other.op, state)
    return state


def test_three_clients_thirty_operations_each(daemon: Daemon, guests: dict[str, str]) -> None:
    calls: list[Call] = []
    lock = threading.Lock()
    threads = [threading.Thread(target=client_run, args=(daemon, c, calls, lock))
               for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == CLIENTS * OPERATIONS
    outcomes = Counter((c.op, c.status) for c in calls)
    print("soak outcomes:", sorted(outcomes.items()))  # shown with -s, and on failure
    # Never a 500, never a 502 here; shown with what ran beside it on its guest.
    undocumented = [(c, beside(calls, c)) for c in calls if c.status not in DOCUMENTED]
    assert not undocumented, undocumented
    conflicts = [c for c in calls if c.status == 409]
    for call in conflicts:
        if beside(calls, call):
            continue
        assert "busy" not in call.body, call  # busy with nothing else running: not real
        assert state_before(calls, call) in REFUSES[call.op], call
    assert any(c.status == 200 and c.op in ("standby", "restore") for c in calls)
    with daemon.client() as api:
        for guest, mark in guests.items():
            state = api.get(f"/instances/{guest}").json()["state"]
            assert state in ("running", "standby"), (guest, state)
            if state == "standby":
                assert api.post(f"/instances/{guest}/restore").status_code == 200
            assert guest_out(api, guest, "md5sum /tmp/ram.bin /root/disk.bin") == mark
        assert api.get("/snapshots").json() == []
    problems = run(InstanceManager(daemon.data_root).check())
    assert problems == [], problems
