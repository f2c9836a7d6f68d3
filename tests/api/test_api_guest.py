"""A real guest driven through the real daemon: every capability over HTTP, progress,
metrics, racing clients, and the CLI as the daemon's client."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import Daemon, start_daemon, stop_daemon
from tests.conftest import torpor_cli
from torpor import faults
from torpor.fsutil import DELETING_PREFIX, allocated_bytes
from torpor.paths import DataRoot
from torpor.units import format_size

pytestmark = pytest.mark.qemu


def call(api: httpx.Client, method: str, path: str, expect: int = 200, **kw: Any) -> Any:
    response = api.request(method, path, **kw)
    assert response.status_code == expect, (method, path, response.status_code, response.text)
    return response.json() if response.content else None


def sh(api: httpx.Client, name: str, script: str) -> str:
    result = call(api, "POST", f"/instances/{name}/exec",
                  json={"argv": ["sh", "-c", script], "timeout": 120})
    assert result["exit_code"] == 0, base64.b64decode(result["stderr_b64"])
    return base64.b64decode(result["stdout_b64"]).decode()


def metric(api: httpx.Client, name: str, default: float | None = None, **labels: str) -> float:
    """One sample's value from /metrics, parsed with prometheus_client's parser. A sample
    that is missing fails the test, unless a `default` says it may not exist yet (a
    counter read before its first increment)."""
    text = call_text(api, "/metrics")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    assert default is not None, f"no sample {name}{labels} in /metrics"
    return default


def started_with_ram(api: httpx.Client, name: str, *, mib: int) -> str:
    """A new 256 MiB guest, running, with `mib` MiB of random data in its RAM (/tmp/ram):
    their md5."""
    call(api, "POST", "/instances", 201, json={"name": name, "memory_mib": 256})
    call(api, "POST", f"/instances/{name}/start", json={})
    return sh(api, name, f"dd if=/dev/urandom of=/tmp/ram bs=1M count={mib} 2>/dev/null;"
                         " md5sum /tmp/ram | cut -c1-32")


def call_text(api: httpx.Client, path: str) -> str:
    response = api.get(path)
    assert response.status_code == 200, response.text
    return response.text


@pytest.fixture(scope="module")
def vm(api: httpx.Client) -> Iterator[str]:
    call(api, "POST", "/instances", 201, json={"name": "apivm", "memory_mib": 512})
    info = call(api, "POST", "/instances/apivm/start", json={})
    assert info["state"] == "running"
    yield "apivm"
    api.delete("/instances/apivm", params={"force": True})


def test_create_start_standby_restore_snapshot_fork_delete(api: httpx.Client, vm: str) -> None:
    ram = sh(api, vm, "dd if=/dev/urandom of=/tmp/ram bs=1M count=48 2>/dev/null;"
                      " md5sum /tmp/ram | cut -c1-32").strip()
    disk = sh(api, vm, "dd if=/dev/urandom of=/root/disk bs=1M count=8 2>/dev/null; sync;"
                       " md5sum /root/disk | cut -c1-32").strip()
    counter = int(sh(api, vm, "cat /run/counter"))
    standbys = metric(api, "torpor_operations_total", 0.0, kind="standby", result="ok")
    pauses = metric(api, "torpor_paused_window_seconds_count", 0.0, kind="standby")

    info = call(api, "POST", f"/instances/{vm}/standby",
                json={"compression": {"codec": "zstd", "level": 3}},
                headers={"X-Torpor-Operation": "standby-1"})
    assert info["state"] == "standby" and info["pid"] is None
    assert info["last_operation"]["kind"] == "standby"
    assert "paused_window" in info["last_operation"]["phases"]
    op = call(api, "GET", "/operations/standby-1")
    assert op["state"] == "succeeded" and op["instance"] == vm
    (save,) = op["progress"]
    assert save["stage"] == "save" and save["done_bytes"] >= 48 << 20
    assert metric(api, "torpor_operations_total", kind="standby", result="ok") == standbys + 1
    assert metric(api, "torpor_paused_window_seconds_count", kind="standby") == pauses + 1

    info = call(api, "POST", f"/instances/{vm}/restore",
                headers={"X-Torpor-Operation": "restore-1"})
    assert info["state"] == "running"
    (load,) = call(api, "GET", "/operations/restore-1")["progress"]
    assert load["done_bytes"] == load["total_bytes"] > 0  # the whole stored file was read
    assert sh(api, vm, "md5sum /tmp/ram | cut -c1-32").strip() == ram
    assert int(sh(api, vm, "cat /run/counter")) > counter

    copied = metric(api, "torpor_copy_bytes_total", 0.0, method="sparse")
    snap = call(api, "POST", f"/instances/{vm}/snapshots", 201,
                json={"name": "s1", "tags": {"why": "api-test"}})
    assert snap["kind"] == "running" and snap["mode"] == "overlapped"
    assert metric(api, "torpor_copy_bytes_total", method="sparse") > copied
    assert [s["name"] for s in call(api, "GET", "/snapshots", params={"instance": vm})] == ["s1"]
    assert call(api, "GET", "/snapshots/s1")["tags"] == {"why": "api-test"}

    (fork,) = call(api, "POST", "/snapshots/s1/fork", 201, json={"new_name": "apifork"})
    assert fork["state"] == "running" and fork["mac"] != info["mac"]
    kinds = {op["kind"] for op in call(api, "GET", "/operations", params={"instance": vm})}
    assert {"standby", "restore", "snapshot", "snapshot-fork"} <= kinds
    assert sh(api, "apifork", "md5sum /tmp/ram | cut -c1-32").strip() == ram
    assert sh(api, "apifork", "md5sum /root/disk | cut -c1-32").strip() == disk
    assert call(api, "DELETE", "/snapshots/s1", 409)["code"] == "wrong_state"  # a fork needs it
    call(api, "DELETE", "/instances/apifork", 409)  # running: needs force
    call(api, "DELETE", "/instances/apifork", 204, params={"force": True})
    call(api, "DELETE", "/snapshots/s1", 204)
    call(api, "GET", "/instances/apifork", 404)

    # Fork of the running instance itself; it keeps running.
    forks = call(api, "POST", f"/instances/{vm}/fork", 201,
                 json={"new_name": "livefork", "count": 1, "target_state": "stopped"})
    assert [f["state"] for f in forks] == ["stopped"]
    assert call(api, "GET", f"/instances/{vm}")["state"] == "running"
    call(api, "DELETE", "/instances/livefork", 204)


def test_stop_start_and_wait(api: httpx.Client) -> None:
    call(api, "POST", "/instances", 201, json={"name": "waitvm", "memory_mib": 256})
    try:
        assert call(api, "GET", "/instances/waitvm/wait",
                    params={"state": "stopped", "timeout": 5})["state"] == "stopped"
        body = call(api, "GET", "/instances/waitvm/wait", 408,
                    params={"state": "running", "timeout": 0.3})
        assert body["code"] == "timeout"
        call(api, "POST", "/instances/waitvm/start", json={"wait_agent": False})
        assert call(api, "GET", "/instances/waitvm/wait",
                    params={"state": "running", "timeout": 30})["state"] == "running"
        info = call(api, "POST", "/instances/waitvm/stop", json={"timeout": 20})
        assert info["state"] == "stopped"
    finally:
        api.delete("/instances/waitvm", params={"force": True})


def test_errors_are_json_with_the_documented_codes(api: httpx.Client, vm: str) -> None:
    assert call(api, "GET", "/instances/nope", 404) == {
        "code": "not_found", "message": "no instance named 'nope'"}
    assert call(api, "POST", "/instances", 400, json={"name": "Bad Name"})["code"] == (
        "invalid_argument")
    assert call(api, "POST", "/instances", 400, json={"memory_mib": 1})["code"] == (
        "invalid_argument")
    assert call(api, "POST", "/instances", 400, content=b"{not json")["code"] == (
        "invalid_argument")
    assert call(api, "POST", "/instances", 409, json={"name": vm})["code"] == "already_exists"
    assert call(api, "POST", f"/instances/{vm}/restore", 409)["code"] == "wrong_state"
    body = call(api, "POST", f"/instances/{vm}/standby", 400,
                json={"compression": {"codec": "zstd", "level": 99}})
    assert "level" in body["message"]
    assert call(api, "GET", "/operations/unknown", 404)["code"] == "not_found"
    assert call(api, "POST", f"/instances/{vm}/standby", 400,
                headers={"X-Torpor-Operation": "bad id!"})["code"] == "invalid_argument"


def race(api: httpx.Client, *requests: tuple[str, str]) -> list[int]:
    """Send the requests at the same moment from separate threads; their statuses."""
    barrier = threading.Barrier(len(requests))
    statuses: list[int] = [0] * len(requests)

    def send(i: int, method: str, path: str) -> None:
        barrier.wait()
        statuses[i] = api.request(method, path).status_code

    threads = [threading.Thread(target=send, args=(i, m, p))
               for i, (m, p) in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


def test_racing_clients_get_one_success_and_one_409(api: httpx.Client, vm: str) -> None:
    # Enough RAM to save that the standby is still running when the restore arrives.
    sh(api, vm, "dd if=/dev/urandom of=/tmp/race bs=1M count=160 2>/dev/null")
    mark = sh(api, vm, "md5sum /tmp/race | cut -c1-32").strip()

    def refusals() -> float:
        return sum(metric(api, "torpor_operations_total", 0.0, kind=kind, result=result)
                   for kind in ("standby", "restore") for result in ("busy", "wrong_state"))

    refused_before = refusals()
    assert sorted(race(api, ("POST", f"/instances/{vm}/standby"),
                       ("POST", f"/instances/{vm}/restore"))) == [200, 409]
    assert call(api, "GET", f"/instances/{vm}")["state"] == "standby"
    assert sorted(race(api, ("POST", f"/instances/{vm}/restore"),
                       ("POST", f"/instances/{vm}/restore"))) == [200, 409]
    assert call(api, "GET", f"/instances/{vm}")["state"] == "running"
    assert sh(api, vm, "md5sum /tmp/race | cut -c1-32; rm /tmp/race").strip() == mark
    # Both refusals of this test were counted, whichever way each race went.
    assert refusals() == refused_before + 2


def test_cli_talks_to_the_daemon_unless_local(api: httpx.Client, daemon: Daemon) -> None:
    before = {op["id"] for op in call(api, "GET", "/operations")}
    created = torpor_cli(daemon.data_root, "create", "clivm", "--memory", "256M")
    assert created.returncode == 0, created.stderr
    ops = [op for op in call(api, "GET", "/operations") if op["id"] not in before]
    assert [(op["kind"], op["instance"]) for op in ops] == [("create", "clivm")]
    shown = torpor_cli(daemon.data_root, "show", "clivm", "--json")
    assert json.loads(shown.stdout)["state"] == "stopped"
    missing = torpor_cli(daemon.data_root, "show", "ghost")
    assert missing.returncode == 3 and "no instance named 'ghost'" in missing.stderr
    local = torpor_cli(daemon.data_root, "--local", "delete", "clivm")
    assert local.returncode == 0, local.stderr
    assert not [op for op in call(api, "GET", "/operations")
                if op["id"] not in before and op["kind"] == "delete"]
    call(api, "GET", "/instances/clivm", 404)


def test_cli_prints_the_same_through_the_daemon_as_in_process(api: httpx.Client,
                                                            daemon: Daemon, vm: str) -> None:
    """Through the daemon the CLI reads the API's JSON without the models (start-up
    time); what it prints must not differ from what it prints in-process: a running VM
    with its last operation's phases, a stored snapshot with tags and timestamps."""
    assert torpor_cli(daemon.data_root, "create", "outvm", "--memory", "128M").returncode == 0
    made = torpor_cli(daemon.data_root, "snapshot", "create", "outvm", "--name", "s1",
                      "--tag", "k=v")
    assert made.returncode == 0, made.stderr
    try:
        for argv in (["list"], ["list", "--json"], ["show", vm], ["show", vm, "--json"],
                     ["show", "outvm"], ["snapshot", "list"], ["snapshot", "list", "--json"],
                     ["snapshot", "show", "s1"], ["operations", "--json"]):
            if argv[0] == "operations":  # the daemon's alone: its JSON is printed as is
                remote = torpor_cli(daemon.data_root, *argv)
                assert remote.returncode == 0 and json.loads(remote.stdout), remote.stderr
                continue
            remote = torpor_cli(daemon.data_root, *argv)
            local = torpor_cli(daemon.data_root, "--local", *argv)
            assert (remote.returncode, local.returncode) == (0, 0), remote.stderr + local.stderr
            assert remote.stdout == local.stdout, argv
        shown = torpor_cli(daemon.data_root, "show", vm).stdout
        assert "phases" in shown and "k=v" in torpor_cli(daemon.data_root, "snapshot",
                                                         "list").stdout
        # What a snapshot occupies, not its sparse disk's size: 2 GiB logical here
        listed = json.loads(torpor_cli(daemon.data_root, "snapshot", "list", "--json").stdout)
        (s1,) = [s for s in listed if s["name"] == "s1"]
        on_disk = allocated_bytes(DataRoot(daemon.data_root).snapshot(s1["id"]).root)
        assert s1["stored_bytes"] == on_disk < s1["logical_bytes"] // 10
        (row,) = [line for line in torpor_cli(daemon.data_root, "snapshot", "list"
                                              ).stdout.splitlines() if " s1 " in f" {line} "]
        assert format_size(on_disk) in row and format_size(s1["logical_bytes"]) not in row
    finally:
        torpor_cli(daemon.data_root, "snapshot", "delete", "s1")
        torpor_cli(daemon.data_root, "--local", "delete", "outvm")


def test_console_through_the_api_and_the_cli(api: httpx.Client, daemon: Daemon, vm: str) -> None:
    whole = api.get(f"/instances/{vm}/console")
    # The boot's output survived the standby/restore cycles (the log is appended to).
    assert whole.status_code == 200 and b"torpor-guest: ready" in whole.content
    head = api.get(f"/instances/{vm}/console", params={"limit": 8})
    assert head.content == whole.content[:8] and head.headers["x-torpor-next-offset"] == "8"
    rest = api.get(f"/instances/{vm}/console", params={"offset": 8})
    assert head.content + rest.content == whole.content
    for route in ("console", "logs"):  # past the end, even past what a file can hold
        beyond = api.get(f"/instances/{vm}/{route}", params={"offset": 1 << 50})
        assert (beyond.status_code, beyond.content) == (200, b""), beyond.text
    printed = torpor_cli(daemon.data_root, "console", vm)
    assert printed.returncode == 0  # (text mode: universal newlines)
    assert printed.stdout.encode() == whole.content.replace(b"\r\n", b"\n")


def test_background_compression_shows_in_metrics(api: httpx.Client, vm: str) -> None:
    completed = metric(api, "torpor_compression_jobs_total", 0.0, outcome="completed")
    saved = metric(api, "torpor_compression_bytes_saved_total", 0.0)
    sh(api, vm, "dd if=/dev/zero of=/tmp/zeros bs=1M count=64 2>/dev/null")
    info = call(api, "POST", f"/instances/{vm}/standby",
                json={"compression": {"codec": "zstd", "mode": "background"}})
    assert info["compression"]["state"] in ("pending", "compressing", "compressed")
    deadline = time.monotonic() + 120
    while call(api, "GET", f"/instances/{vm}")["compression"]["state"] != "compressed":
        assert time.monotonic() < deadline, call(api, "GET", f"/instances/{vm}")
        time.sleep(0.2)
    assert metric(api, "torpor_compression_jobs_total", outcome="completed") == completed + 1
    assert metric(api, "torpor_compression_bytes_saved_total") > saved
    assert metric(api, "torpor_compression_jobs_active") == 0
    assert call(api, "POST", f"/instances/{vm}/restore")["state"] == "running"
    sh(api, vm, "rm /tmp/zeros")


def test_a_snapshot_compressed_in_the_background_through_the_api(api: httpx.Client,
                                                                  vm: str) -> None:
    """`mode: background` on a snapshot request: saved raw, compressed by a job on the
    stored snapshot, shown by GET /snapshots, and a fork of it is intact."""
    mark = sh(api, vm, "dd if=/dev/urandom of=/tmp/bgapi bs=1M count=4 2>/dev/null;"
                       " md5sum /tmp/bgapi | cut -c1-32").strip()
    snap = call(api, "POST", f"/instances/{vm}/snapshots", 201, json={
        "name": "bgapi", "compression": {"codec": "zstd", "mode": "background"}})
    try:
        assert snap["compression"]["state"] in ("pending", "compressing", "compressed")
        deadline = time.monotonic() + 120
        while (shown := call(api, "GET", "/snapshots/bgapi"))["compression"]["state"] \
                != "compressed":
            assert shown["compression"]["state"] in ("pending", "compressing"), shown
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert shown["state_codec"] == "zstd"
        assert shown["compression"]["compressed_bytes"] < shown["compression"]["raw_bytes"]
        call(api, "POST", "/snapshots/bgapi/fork", 201, json={"new_name": "bgapi-fork"})
        try:
            assert sh(api, "bgapi-fork", "md5sum /tmp/bgapi | cut -c1-32").strip() == mark
        finally:
            call(api, "DELETE", "/instances/bgapi-fork", 204, params={"force": True})
    finally:
        call(api, "DELETE", "/snapshots/bgapi", 204)


def test_a_restored_state_is_removed_though_the_daemon_stops_right_after() -> None:
    """The daemon removes a restore's loaded state after the call (its reaper): stopping
    it at once still leaves nothing behind, for it waits for the removal."""
    daemon = start_daemon()
    try:
        with daemon.client() as api:
            call(api, "POST", "/instances", 201, json={"name": "reaped", "memory_mib": 256})
            call(api, "POST", "/instances/reaped/start", json={})
            sh(api, "reaped", "dd if=/dev/urandom of=/tmp/ram bs=1M count=96 2>/dev/null")
            call(api, "POST", "/instances/reaped/standby", json={})
            snapshots_dir = Path(call(api, "GET", "/instances/reaped")["path"]) / "snapshots"
            assert [p.name for p in snapshots_dir.iterdir()] == ["latest"]
            assert call(api, "POST", "/instances/reaped/restore")["state"] == "running"
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=60) == 0, (daemon.data_root / "torpord.log").read_text()
        assert list(snapshots_dir.iterdir()) == []
        assert not list(daemon.data_root.rglob(f"{DELETING_PREFIX}*"))
    finally:
        stop_daemon(daemon)


@pytest.mark.parametrize("action", ["error", "kill"])
def test_a_removal_after_the_call_that_fails_or_dies_leaves_the_guest_running(
        action: str) -> None:
    """The fault matrix's `reaper.` points, in the daemon (where removals outlive the
    call): an error is logged and the daemon serves on; a kill ends it mid-restore. Either
    way the guest runs with its RAM, and once the daemon is gone `check --repair` removes
    what was set aside."""
    daemon = start_daemon(env={faults.ENV: f"reaper.set-aside={action}"})
    root = daemon.data_root
    try:
        with daemon.client() as api:
            ram = started_with_ram(api, "leftover", mib=16)
            call(api, "POST", "/instances/leftover/standby", json={})
            if action == "error":
                assert call(api, "POST", "/instances/leftover/restore")["state"] == "running"
                assert sh(api, "leftover", "md5sum /tmp/ram | cut -c1-32") == ram
                daemon.process.send_signal(signal.SIGTERM)
                assert daemon.process.wait(timeout=60) == 0
                assert "injected fault at reaper.set-aside" in (root / "torpord.log").read_text()
            else:
                with pytest.raises(httpx.TransportError):
                    api.post("/instances/leftover/restore")
                assert daemon.process.wait(timeout=60) == -signal.SIGKILL
        found = json.loads(torpor_cli(root, "check", "--json").stdout)["problems"]
        assert any(p["kind"] == "deleting" and ".latest.consumed" in p["path"] for p in found)
        assert torpor_cli(root, "check", "--repair").returncode == 0
        assert torpor_cli(root, "check").returncode == 0
        shown = json.loads(torpor_cli(root, "show", "leftover", "--json").stdout)
        assert shown["state"] == "running"
        again = torpor_cli(root, "exec", "leftover", "--", "sh", "-c",
                           "md5sum /tmp/ram | cut -c1-32")
        assert again.returncode == 0 and again.stdout == ram, again.stderr
    finally:
        stop_daemon(daemon)


def test_ctrl_c_of_a_command_through_the_daemon_leaves_the_operation_to_it() -> None:
    """A Ctrl-C of `torpor standby` served by the daemon (sent from the daemon's own
    standby, at its paused window: deterministic) ends the command with exit 130 and one
    line saying the daemon finishes; the daemon does (it used to be a silent exit 130)."""
    root = Path(tempfile.mkdtemp(prefix="tpa-", dir="/tmp"))
    pid_file = root / "cli.pid"
    daemon = start_daemon(root=root, env={faults.ENV: "standby.paused=exec",
                                          faults.EXEC_ENV: f"kill -INT $(cat {pid_file})"})
    try:
        with daemon.client() as api:
            ram = started_with_ram(api, "ctrlc", mib=8)
            cli = subprocess.Popen(
                [sys.executable, "-m", "torpor.cli.main", "standby", "ctrlc"],
                env=dict(os.environ, TORPOR_DATA_ROOT=str(root)),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            pid_file.write_text(str(cli.pid))  # long before its request reaches the point
            _, err = cli.communicate(timeout=120)
            assert (cli.returncode, err.strip().splitlines()) == (130, [
                "torpor: interrupted: the daemon finishes the operation "
                "(`torpor list` shows it)"]), err
            finished = call(api, "GET", "/instances/ctrlc/wait",
                            params={"state": "standby", "timeout": 60})
            assert finished["state"] == "standby"
            assert call(api, "POST", "/instances/ctrlc/restore")["state"] == "running"
            assert sh(api, "ctrlc", "md5sum /tmp/ram | cut -c1-32") == ram
    finally:
        stop_daemon(daemon)
