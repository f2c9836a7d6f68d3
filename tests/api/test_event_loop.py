"""Nothing blocks the daemon's event loop: a daemon in asyncio's debug mode, with every
callback longer than 50 ms logged, goes through a create/start/standby/restore/snapshot/
fork/delete cycle and must log none. (The first one it found: the first `start` on a host
probed KVM by booting the guest kernel on the event loop, 6 s during which the daemon
answered nobody.)"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.api.conftest import Daemon, start_daemon, stop_daemon
from torpor.api.app import SLOW_CALLBACK_ENV

pytestmark = pytest.mark.qemu


@pytest.fixture
def watched_daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    monkeypatch.setenv(SLOW_CALLBACK_ENV, "0.05")
    daemon = start_daemon()
    yield daemon
    stop_daemon(daemon)


def test_no_request_holds_the_event_loop(watched_daemon: Daemon) -> None:
    with watched_daemon.client() as api:
        def ok(response: httpx.Response) -> None:
            assert response.status_code < 300, response.text

        ok(api.post("/instances", json={"name": "loop", "memory_mib": 256}))
        ok(api.post("/instances/loop/start"))
        ok(api.post("/instances/loop/standby"))
        ok(api.post("/instances/loop/restore"))
        ok(api.post("/instances/loop/snapshots", json={"name": "s"}))
        ok(api.post("/instances/loop/fork", json={"new_name": "loop-fork"}))
        ok(api.get("/instances"))
        ok(api.get("/metrics"))
        ok(api.delete("/instances/loop-fork", params={"force": True}))
        ok(api.delete("/snapshots/s"))
        ok(api.delete("/instances/loop", params={"force": True}))
    log = (watched_daemon.data_root / "torpord.log").read_text()
    slow = [line for line in log.splitlines() if "Executing" in line and " took " in line]
    assert not slow, "\n".join(slow)
