"""The foundation on real guests: boot, exec, stop, delete, derived state, locking."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run, torpor_cli
from torpor.errors import OperationFailed, WrongState
from torpor.fsutil import atomic_write_json, read_json
from torpor.guest.agent import GuestAgent
from torpor.hypervisor.accel import AccelChoice, resolve_accel
from torpor.images.builtin import GuestImage
from torpor.instances import InstanceState, runtime
from torpor.instances.context import Settings
from torpor.instances.runtime import load_runtime
from torpor.manager import InstanceManager
from torpor.paths import InstancePaths

pytestmark = pytest.mark.qemu


def test_exec_returns_output_and_exit_code(manager: InstanceManager, shared_vm: str) -> None:
    result = run(manager.exec(shared_vm, ["/bin/sh", "-c", "echo hello; echo oops >&2; exit 7"]))
    assert (result.stdout, result.stderr, result.exit_code) == (b"hello\n", b"oops\n", 7)


def test_default_guest_can_rekey_its_rng(manager: InstanceManager, shared_vm: str) -> None:
    """What forks rely on for their own randomness (the kernel has no vmgenid driver)."""
    result = run(manager.exec(shared_vm, ["/sbin/torpor-reseed"]))
    assert result.exit_code == 0, result


def test_counter_workload_runs(manager: InstanceManager, shared_vm: str) -> None:
    def counter() -> int:
        return int(run(manager.exec(shared_vm, ["cat", "/run/counter"])).stdout)

    first = counter()
    time.sleep(0.5)
    assert counter() > first


def test_agent_file_round_trip(manager: InstanceManager, shared_vm: str) -> None:
    payload = os.urandom(300_000)

    async def round_trip() -> bytes:
        async with GuestAgent.connect(manager.paths(shared_vm).agent_pipe) as agent:
            await agent.write_file("/tmp/blob", payload)
            return await agent.read_file("/tmp/blob")

    assert run(round_trip()) == payload


def test_cli_exec_show_and_errors(data_root: Path, shared_vm: str) -> None:
    ok = torpor_cli(data_root, "exec", shared_vm, "--", "sh", "-c", "echo hi; exit 3")
    assert (ok.returncode, ok.stdout) == (3, "hi\n")
    shown = torpor_cli(data_root, "show", shared_vm, "--json")
    assert shown.returncode == 0
    import json
    info = json.loads(shown.stdout)
    assert info["name"] == shared_vm and info["state"] == "running" and len(info["id"]) == 12
    again = torpor_cli(data_root, "start", shared_vm)
    assert again.returncode == 4
    assert again.stderr.strip() == f"torpor: error: instance {shared_vm} is already running"
    for args, code in ((["create", "Bad_Name"], 2), (["show", "nope"], 3),
                       (["stop", "nope"], 3), (["create", "x" * 64], 2),
                       (["create", "tiny", "--disk-size", "1K"], 2)):
        bad = torpor_cli(data_root, *args)
        assert bad.returncode == code, bad.stderr
        assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    too_small = r"at least the image's size, [\d.]+ GiB \(\d+ bytes\)$"
    assert re.search(too_small, bad.stderr.strip()), bad.stderr


def test_cli_exec_of_a_command_the_guest_cannot_start_exits_as_a_shell_would(
        data_root: Path, shared_vm: str) -> None:
    """127 for a command not found, 126 for one that cannot run, with a line on stderr
    (it was exit 1 and qemu-ga's "guest-exec failed: … Failed to execute child process")."""
    missing = torpor_cli(data_root, "exec", shared_vm, "--", "no-such-command")
    assert (missing.returncode, missing.stdout, missing.stderr) == (
        127, "", "torpor: no-such-command: no such file or directory (in the guest)\n")
    denied = torpor_cli(data_root, "exec", shared_vm, "--", "/etc/hostname")
    assert (denied.returncode, denied.stderr) == (
        126, "torpor: /etc/hostname: permission denied (in the guest)\n")


def test_cli_exec_takes_stdin_and_large_output(data_root: Path, shared_vm: str) -> None:
    """`--stdin` sends the CLI's standard input (it was ignored: `echo x | torpor exec vm
    -- cat` printed nothing); an output of 13 MiB comes back whole (the agent's reply
    line used to exceed the reader's 16 MiB limit: an error, no output); past qemu-ga's
    16 MiB it is cut, and the CLI says so."""
    payload = os.urandom(100_000)
    piped = subprocess.run([sys.executable, "-m", "torpor.cli.main", "exec", "--stdin",
                            shared_vm, "--", "md5sum"], input=payload, capture_output=True,
                           env=dict(os.environ, TORPOR_DATA_ROOT=str(data_root)), check=False)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.split()[0].decode() == hashlib.md5(payload).hexdigest()
    big = torpor_cli(data_root, "exec", shared_vm, "--", "sh", "-c",
                     "dd if=/dev/zero bs=1M count=13 2>/dev/null | tr '\\0' x")
    assert (big.returncode, len(big.stdout), big.stderr) == (0, 13 << 20, "")
    cut = torpor_cli(data_root, "exec", shared_vm, "--", "sh", "-c",
                     "dd if=/dev/zero bs=1M count=17 2>/dev/null | tr '\\0' x")
    assert (cut.returncode, len(cut.stdout)) == (0, 16 << 20), cut.stderr
    assert cut.stderr.strip().splitlines() == [
        "torpor: warning: the guest agent kept only the first 16 MiB of the command's output"]


def test_start_stop_delete_leave_nothing(manager: InstanceManager, fresh_name: str) -> None:
    run(manager.create(fresh_name))
    paths = manager.paths(fresh_name)
    info = run(manager.start(fresh_name))
    assert info.state is InstanceState.RUNNING and info.pid
    assert info.last_operation and set(info.last_operation.phases) == {
        "spawn", "agent-ready", "identity", "clock_behind"}  # the clock set by the helper
    record = load_runtime(paths)
    assert record is not None and record.identity.is_alive()
    stopped = run(manager.stop(fresh_name))
    assert stopped.state is InstanceState.STOPPED
    assert not record.identity.is_alive()
    assert not any(sock.exists() for sock in paths.sockets())
    assert list(paths.run_dir.iterdir()) == []
    run(manager.delete(fresh_name))
    assert not paths.root.exists()
    assert fresh_name not in [i.name for i in run(manager.list_all())]


def test_instances_are_listed_by_name(manager: InstanceManager, data_root: Path) -> None:
    """By name, not by the random ids their directories are named after: six names
    created out of order (the ids' order matches theirs one time in 720)."""
    names = [f"order-{letter}" for letter in "fbdaec"]
    try:
        for name in names:
            run(manager.create(name))
        listed = [info.name for info in run(manager.list_all())]
        assert [n for n in listed if n in names] == sorted(names)
        assert listed == sorted(listed)
        table = torpor_cli(data_root, "list").stdout
        assert [line.split()[0] for line in table.splitlines()[1:]] == listed
    finally:
        for name in names:
            run(manager.delete(name, force=True))


def test_qemu_failing_to_start_reports_its_error(manager: InstanceManager, data_root: Path,
                                                fresh_name: str) -> None:
    """QEMU's own message comes back (from its log) and nothing is left running."""
    run(manager.create(fresh_name))
    paths = manager.paths(fresh_name)
    # There, but QEMU cannot open it for writing, not even as root (a missing disk is
    # torpor's own error).
    subprocess.run(["chattr", "+i", str(paths.disk)], check=True)
    try:
        with pytest.raises(OperationFailed, match=r"QEMU failed to start: .*disk\.raw"):
            run(manager.start(fresh_name))
    finally:
        subprocess.run(["chattr", "-i", str(paths.disk)], check=True)
    assert run(manager.get(fresh_name)).state is InstanceState.STOPPED
    assert load_runtime(paths) is None and not paths.pidfile.exists()
    missing = InstanceManager(data_root, Settings(accel="tcg", qemu_binary="/no/such/qemu"))
    with pytest.raises(OperationFailed, match=r"QEMU binary not found: /no/such/qemu"):
        run(missing.start(fresh_name))
    run(manager.delete(fresh_name, force=True))


def test_disk_writes_survive_reboot(manager: InstanceManager, fresh_name: str) -> None:
    run(manager.create(fresh_name))
    try:
        run(manager.start(fresh_name))
        run(manager.exec(fresh_name, ["sh", "-c", "echo persisted > /root/mark; sync"]))
        run(manager.stop(fresh_name))
        run(manager.start(fresh_name))
        assert run(manager.exec(fresh_name, ["cat", "/root/mark"])).stdout == b"persisted\n"
    finally:
        run(manager.delete(fresh_name, force=True))


def test_qemu_killed_behind_our_back_is_crashed(manager: InstanceManager,
                                                fresh_name: str) -> None:
    run(manager.create(fresh_name))
    try:
        info = run(manager.start(fresh_name))
        assert info.pid
        os.kill(info.pid, signal.SIGKILL)
        record = load_runtime(manager.paths(fresh_name))
        assert record is not None
        assert record.process().wait_exit(10)
        assert run(manager.get(fresh_name)).state is InstanceState.CRASHED
        # A crashed instance can be started again; the disk is intact.
        assert run(manager.start(fresh_name)).state is InstanceState.RUNNING
        assert run(manager.exec(fresh_name, ["true"])).exit_code == 0
    finally:
        run(manager.delete(fresh_name, force=True))


def test_a_missing_disk_is_named_and_nothing_starts(manager: InstanceManager,
                                                    fresh_name: str) -> None:
    run(manager.create(fresh_name))
    disk = manager.paths(fresh_name).disk
    try:
        disk.rename(disk.with_suffix(".aside"))
        with pytest.raises(OperationFailed,
                           match=f"^the disk of instance {fresh_name} is missing: {disk}$"):
            run(manager.start(fresh_name))
        assert run(manager.get(fresh_name)).state is InstanceState.STOPPED
        assert load_runtime(manager.paths(fresh_name)) is None  # no QEMU was launched
        found = [(p.kind, p.path) for p in run(manager.check(repair=True))]
        assert found == [("missing-disk", str(disk))]  # reported, never "repaired"
    finally:
        run(manager.delete(fresh_name, force=True))


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def test_a_hung_qemu_is_unresponsive_and_stop_kills_it(manager: InstanceManager,
                                                       fresh_name: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A QEMU that runs but does not answer its monitor (stopped here with SIGSTOP) is
    `unresponsive`: every command but stop and delete --force is refused at once, and
    stop kills it (recovery used to fail on its monitor: nothing could free it). Stop
    waits for the silent monitor twice, not three times: once briefly before the lock,
    once in recovery, whose verdict the state under the lock takes."""
    run(manager.create(fresh_name))
    pid = run(manager.start(fresh_name)).pid
    assert pid
    try:
        os.kill(pid, signal.SIGSTOP)
        info = run(manager.get(fresh_name))
        assert (info.state, info.pid) == (InstanceState.UNRESPONSIVE, pid)
        refusal = f"instance {fresh_name} is unresponsive: .*`torpor stop {fresh_name}` kills it"
        with pytest.raises(WrongState, match=refusal):  # (each action: tests/unit/test_states.py)
            run(manager.standby(fresh_name))
        os.kill(pid, signal.SIGCONT)  # derived, never stored: it answers again
        assert run(manager.get(fresh_name)).state is InstanceState.RUNNING
        os.kill(pid, signal.SIGSTOP)
        queries: list[float] = []
        real_query = runtime.query_vm_status

        async def counted(paths: InstancePaths, timeout: float = runtime.QUERY_TIMEOUT
                          ) -> str | None:
            queries.append(timeout)
            return await real_query(paths, timeout)

        monkeypatch.setattr(runtime, "query_vm_status", counted)
        assert run(manager.stop(fresh_name)).state is InstanceState.STOPPED
        assert queries == [runtime.PRE_LOCK_QUERY_TIMEOUT]
        monkeypatch.undo()
        assert not _cmdline(pid)  # killed (a zombie at most)
        assert run(manager.start(fresh_name)).state is InstanceState.RUNNING
        assert run(manager.exec(fresh_name, ["true"])).exit_code == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        run(manager.delete(fresh_name, force=True))


def test_two_processes_starting_one_instance_are_serialised(
        data_root: Path, manager: InstanceManager, fresh_name: str) -> None:
    run(manager.create(fresh_name))
    try:
        env = dict(os.environ, TORPOR_DATA_ROOT=str(data_root))
        procs = [subprocess.Popen([sys.executable, "-m", "torpor.cli.main", "start", fresh_name],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        results = sorted((p.wait(120), p.stderr.read() if p.stderr else "") for p in procs)
        for p in procs:
            for stream in (p.stdout, p.stderr):
                if stream:
                    stream.close()
        assert [code for code, _ in results] == [0, 4], results
        assert "already running" in results[1][1]
        # Exactly one QEMU process runs this instance's disk.
        disk = str(manager.paths(fresh_name).disk)
        pids = subprocess.run(["pgrep", "-f", disk], capture_output=True, text=True).stdout
        assert len(pids.split()) == 1
    finally:
        run(manager.delete(fresh_name, force=True))


def test_kvm_probe_falls_back_and_is_cached_for_the_data_root_and_the_host(
        guest_image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torpor.hypervisor.accel as accel

    probes: list[tuple[bool, str]] = []
    real_probe = accel.probe_kvm

    def counted(*args: Any, **kwargs: Any) -> tuple[bool, str]:
        probes.append(real_probe(*args, **kwargs))
        return probes[-1]

    monkeypatch.setattr(accel, "probe_kvm", counted)
    kernels = []  # each data root has its own copy of the kernel
    for root in ("a", "b"):
        (tmp_path / root).mkdir()
        kernels.append(Path(shutil.copy2(guest_image.kernel, tmp_path / root / "vmlinux")))
    host = tmp_path / "host"

    def resolve(root: int, choice: AccelChoice = "auto") -> str:
        return resolve_accel(choice, kernel=kernels[root], initrd=guest_image.initrd,
                             cache_file=tmp_path / f"root{root}.json",
                             host_cache=lambda digest: host / f"{digest}.json")

    chosen = resolve(0)
    assert len(probes) == 1 and chosen == ("kvm" if probes[0][0] else "tcg"), probes
    # Another data root with the same kernel: the host's verdict, no probe; kept there.
    assert resolve(1) == chosen and len(probes) == 1
    assert read_json(tmp_path / "root1.json")["kvm_works"] is probes[0][0]
    (host_file,) = host.iterdir()
    host_file.unlink()
    assert resolve(1) == chosen and len(probes) == 1  # its own verdict now
    assert resolve(0, "tcg") == "tcg"
    # A verdict taken under another host kernel (its KVM) holds no more: probed again.
    stale = read_json(tmp_path / "root0.json")
    stale["key"]["host_kernel"] = "another"
    atomic_write_json(tmp_path / "root0.json", stale)
    assert resolve(0) == chosen and len(probes) == 2
    assert read_json(tmp_path / "root0.json")["key"]["host_kernel"] == os.uname().release
    assert host_file.exists()
