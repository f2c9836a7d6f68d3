"""The daemon's restore pool (TORPOR_RESTORE_POOL): a memory-file instance in standby gets
a QEMU started ahead of its restore, which the restore claims instead of starting one;
every other operation discards it; the daemon's exit kills it, and `torpor check` kills
one whose daemon is gone."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx
import pytest

from tests.api.conftest import Daemon, start_daemon, stop_daemon
from tests.api.test_api_guest import call, metric, sh
from tests.conftest import torpor_cli
from torpor.machinestate.manifest import FileIdentity
from torpor.operations import warm
from torpor.operations.warm import WarmRecord
from torpor.paths import DataRoot, InstancePaths

pytestmark = pytest.mark.qemu
T = TypeVar("T")
MARKS = "md5sum /tmp/ram.bin /root/disk.bin"


@pytest.fixture(scope="module")
def pooled() -> Iterator[Daemon]:
    daemon = start_daemon(env={"TORPOR_RESTORE_POOL": "1"})
    yield daemon
    stop_daemon(daemon)


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 60) -> T:
    """probe() until it gives something: the daemon's background work, seen in the files
    and processes it makes."""
    deadline = time.monotonic() + timeout
    while (found := probe()) is None:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


def paths_of(daemon: Daemon, api: httpx.Client, name: str) -> InstancePaths:
    return DataRoot(daemon.data_root).instance(call(api, "GET", f"/instances/{name}")["id"])


def waiting(paths: InstancePaths) -> WarmRecord:
    return eventually(lambda: warm.owned_alive(paths), "a QEMU waiting for the restore")


def booted_in_standby(api: httpx.Client, name: str) -> str:
    call(api, "POST", "/instances", 201,
         json={"name": name, "memory_mib": 256, "memory_backing": "file"})
    call(api, "POST", f"/instances/{name}/start", json={})
    marks = sh(api, name, "dd if=/dev/urandom of=/tmp/ram.bin bs=1M count=8 2>/dev/null;"
                          " dd if=/dev/urandom of=/root/disk.bin bs=1M count=2 2>/dev/null;"
                          f" sync; {MARKS}")
    call(api, "POST", f"/instances/{name}/standby", json={})
    return marks


def test_the_restore_claims_the_waiting_qemu(pooled: Daemon) -> None:
    with pooled.client() as api:
        marks = booted_in_standby(api, "pool-a")
        paths = paths_of(pooled, api, "pool-a")
        ready = waiting(paths)
        assert ready.owner.pid == pooled.process.pid
        assert call(api, "GET", "/instances/pool-a")["state"] == "standby"  # still
        assert metric(api, "torpor_restore_pool_qemus") == 1
        assert torpor_cli(pooled.data_root, "--local", "check").returncode == 0  # no stray
        restored = call(api, "POST", "/instances/pool-a/restore", json={})
        assert restored["pid"] == ready.identity.pid  # that QEMU, not a new one
        assert warm.load(paths) is None
        assert sh(api, "pool-a", MARKS) == marks  # RAM and disk as saved
        # Standby again: a new one waits; deleting the instance kills it.
        call(api, "POST", "/instances/pool-a/standby", json={})
        again = waiting(paths)
        assert again.identity != ready.identity
        call(api, "DELETE", "/instances/pool-a", 204, params={"force": True})
        assert not again.identity.is_alive()


def test_other_operations_discard_it_and_the_pool_refills(pooled: Daemon) -> None:
    with pooled.client() as api:
        marks = booted_in_standby(api, "pool-b")
        paths = paths_of(pooled, api, "pool-b")
        first = waiting(paths)
        snap = call(api, "POST", "/instances/pool-b/snapshots", 201, json={"name": "s"})
        assert not first.identity.is_alive()  # the snapshot read the state: discarded
        second = waiting(paths)  # the pool's next round starts another
        assert second.identity != first.identity
        call(api, "POST", "/instances/pool-b/restore", json={})
        assert sh(api, "pool-b", MARKS) == marks
        call(api, "DELETE", f"/snapshots/{snap['id']}", 204)
        call(api, "DELETE", "/instances/pool-b", 204, params={"force": True})


def test_after_a_fork_the_pool_gives_the_source_its_own_files_before_its_qemu_maps_them(
        pooled: Daemon) -> None:
    """A fork's base links a standby source's disk and RAM file; the pool's next QEMU for
    the source maps its own copy (made in the background), never the base's file."""
    with pooled.client() as api:
        marks = booted_in_standby(api, "pool-src")
        paths = paths_of(pooled, api, "pool-src")
        first = waiting(paths)
        call(api, "POST", "/instances/pool-src/fork", 201, json={"new_name": "pool-fk"})
        assert not first.identity.is_alive()  # the fork discarded it
        second = waiting(paths)
        assert [p.stat().st_nlink for p in (paths.disk, paths.memory_file)] == [1, 1]
        assert second.memory == FileIdentity.of(paths.memory_file)
        restored = call(api, "POST", "/instances/pool-src/restore", json={})
        assert restored["pid"] == second.identity.pid
        sh(api, "pool-src", "dd if=/dev/urandom of=/tmp/ram.bin bs=1M count=8 2>/dev/null")
        assert sh(api, "pool-fk", MARKS) == marks  # the base's RAM, not the source's
        for name in ("pool-fk", "pool-src"):
            call(api, "DELETE", f"/instances/{name}", 204, params={"force": True})


def test_the_daemon_cleans_up_and_check_kills_those_of_a_dead_daemon() -> None:
    daemon = start_daemon(env={"TORPOR_RESTORE_POOL": "1"})
    try:
        with daemon.client() as api:
            booted_in_standby(api, "pool-c")
            paths = paths_of(daemon, api, "pool-c")
        orphan = waiting(paths)
        daemon.process.send_signal(signal.SIGKILL)  # no cleanup: the QEMU outlives it
        daemon.process.wait()
        assert orphan.identity.is_alive()
        found = torpor_cli(daemon.data_root, "--local", "check")
        assert found.returncode != 0 and "stray-qemu" in found.stdout + found.stderr
        assert torpor_cli(daemon.data_root, "--local", "check", "--repair").returncode == 0
        assert not orphan.identity.is_alive()
        # A daemon on the same data root starts one again, and kills it as it stops.
        restarted = start_daemon(root=daemon.data_root, env={"TORPOR_RESTORE_POOL": "1"})
        daemon = restarted
        fresh = waiting(paths)
        assert fresh.owner.pid == restarted.process.pid
        restarted.process.send_signal(signal.SIGTERM)
        assert restarted.process.wait(timeout=60) == 0
        assert not fresh.identity.is_alive()
        assert torpor_cli(restarted.data_root, "--local", "check").returncode == 0
    finally:
        stop_daemon(daemon)
