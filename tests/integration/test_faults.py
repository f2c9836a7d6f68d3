"""The fault matrix: every fault point × {error, kill, interrupt} on real guests, one
invariant.

Each case runs the real CLI (a process of its own, so `kill` is a real SIGKILL of it, as a
crash or `kill -9` would be, and `interrupt` a real SIGINT, as a Ctrl-C) with one fault
point enabled, then checks:
- the error was one line, `torpor: error: …`, naming the injected fault (no traceback);
  an interrupt's, `torpor: interrupted` with exit status 130;
- after an error or an interrupt, the data root is already clean (`check` finds
  nothing); after a kill,
  `check --repair` repairs everything it finds and a second scan is clean (no QEMU, lock,
  temp file, partial or `.creating-*` directory left);
- the VM is running or restorable, and once running its RAM (a file in tmpfs and the
  in-RAM counter) and its disk (a synced file) hold what they held before the fault.

QEMU dying mid-save, mid-load and mid-snapshot are cases too (`exec` action killing QEMU at
the point): there the RAM is lost by definition and the disk must be intact.

Guests are shared: one source guest for the whole module, brought back to running after
every case; forks and snapshots a case makes are deleted after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EMPTY_MD5, booted, run, running, sh, torpor_cli
from torpor import faults
from torpor.codec import Codec
from torpor.errors import WrongState
from torpor.fsutil import owned_name
from torpor.hypervisor.qmp import Monitor
from torpor.instances import InstanceState
from torpor.instances.metadata import CompressionPolicy
from torpor.instances.runtime import load_runtime
from torpor.jobs import compression as compression_jobs
from torpor.manager import InstanceManager

pytestmark = pytest.mark.qemu
ACTIONS = ("error", "kill", "interrupt")


@pytest.fixture(scope="module")
def booted_fm(manager: InstanceManager) -> Iterator[str]:
    yield from booted(manager, "fm", memory=256 << 20)


@pytest.fixture
def fm(manager: InstanceManager, booted_fm: str) -> str:
    """Running at each test's start, whatever a failed test before it left."""
    return running(manager, booted_fm)


def plant(manager: InstanceManager, name: str) -> dict[str, str]:
    """Fresh random data in the guest's RAM (tmpfs) and on its disk (synced)."""
    out = sh(manager, name, "dd if=/dev/urandom of=/tmp/ram.bin bs=64k count=32 2>/dev/null;"
             " dd if=/dev/urandom of=/root/disk.bin bs=64k count=8 2>/dev/null; sync;"
             " md5sum /tmp/ram.bin /root/disk.bin; cat /run/counter")
    assert EMPTY_MD5 not in out, out
    ram, disk, counter = out.split("\n")[:3]
    return {"ram": ram.split()[0], "disk": disk.split()[0], "counter": counter}


def verify(manager: InstanceManager, name: str, planted: dict[str, str], *,
           ram_kept: bool = True) -> None:
    if ram_kept:
        out = sh(manager, name, "md5sum /tmp/ram.bin /root/disk.bin; cat /run/counter")
        ram, disk, counter = out.split("\n")[:3]
        assert ram.split()[0] == planted["ram"], "guest RAM differs after the fault"
        assert int(counter) >= int(planted["counter"]), "the guest's processes restarted"
    else:
        disk = sh(manager, name, "md5sum /root/disk.bin").strip()
    assert disk.split()[0] == planted["disk"], "guest disk differs after the fault"


def faulted(data_root: Path, point: str, action: str, *argv: str,
            exec_cmd: str | None = None) -> None:
    """Run `torpor --local ARGV` with the fault; check how it ended."""
    env = {faults.ENV: f"{point}={action}"}
    if exec_cmd is not None:
        env[faults.EXEC_ENV] = exec_cmd
    result = torpor_cli(data_root, "--local", *argv, env=env)
    if action == "kill":
        assert result.returncode == -9, (result.returncode, result.stderr)
    elif action == "error":
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, result.stderr
        assert len(lines) == 1 and lines[0].startswith("torpor: error: "), result.stderr
        assert f"injected fault at {point}" in lines[0]
    else:  # interrupted: cancelled at the next await, its cleanup run, then exit 130
        assert (result.returncode, result.stderr.strip().splitlines()[-1:]) == (
            130, ["torpor: interrupted"]), (result.returncode, result.stderr)


def settle(manager: InstanceManager, action: str, case: str = "") -> None:
    """The invariant checker: clean after an error; after a kill, repaired to clean.
    Prints a line of the points × outcomes table (pytest -s shows it)."""
    states = {info.name: str(info.state) for info in run(manager.list_all())}
    repaired: list[str] = []
    if action == "kill":
        problems = run(manager.check(repair=True))
        assert all(p.repaired for p in problems), [p for p in problems if not p.repaired]
        repaired = sorted({p.kind for p in problems})
    assert run(manager.check()) == []
    print(f"OUTCOME | {case} | {action} | {states} | {', '.join(repaired) or '-'}")


def wait_for_job(manager: InstanceManager, name: str, timeout: float = 60) -> None:
    """Until the instance's worker has exited (it holds the job lock from its launch on;
    whatever it records, it records before it exits)."""
    key = compression_jobs.instance_job_key(run(manager.get(name)).id)
    deadline = time.monotonic() + timeout
    while compression_jobs.job_running(manager.data_root, key):
        assert time.monotonic() < deadline, "the compression job did not end"
        time.sleep(0.05)


def points(prefix: str) -> list[str]:
    return [p for p in faults.POINTS if p.startswith(prefix)]


def test_every_point_is_in_the_matrix() -> None:
    # push., pull. and remote-delete.: tests/integration/test_remote_snapshots.py (a real
    # S3 server); reaper.: tests/api/test_api_guest.py (in the daemon, where it matters);
    # unshare.: tests/integration/test_memory_file.py (memory-file forks only)
    covered = {p for group in ("standby.", "restore.", "snapshot.", "fork.", "delete.",
                               "compress.", "push.", "pull.", "remote-delete.", "reaper.",
                               "unshare.")
               for p in points(group)}
    assert covered == set(faults.POINTS)


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("point", points("standby."))
def test_standby(manager: InstanceManager, data_root: Path, fm: str, point: str,
                 action: str) -> None:
    planted = plant(manager, fm)
    faulted(data_root, point, action, "standby", fm)
    settle(manager, action, point)
    running(manager, fm)
    verify(manager, fm, planted)



@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("point", ["compress.renamed", "compress.recorded"])
def test_auto_standby_compressing_after_the_window(manager: InstanceManager, data_root: Path,
                                                  fm: str, point: str, action: str) -> None:
    """`auto` compresses the published state after the paused window, in the standby's
    own process: killed there, the state is restorable; failing there, the standby
    still succeeds, saying that its state stays uncompressed."""
    planted = plant(manager, fm)
    result = torpor_cli(data_root, "--local", "standby", fm, "--compress", "auto",
                        env={faults.ENV: f"{point}={action}"})
    if action == "kill":
        assert result.returncode == -9, result.stderr
    elif action == "interrupt":  # the standby is done: the compression is what stops
        assert result.returncode == 130, result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert f"stays uncompressed: injected fault at {point}" in result.stderr
    assert run(manager.get(fm)).state is InstanceState.STANDBY
    settle(manager, action, f"auto standby, {point}")
    running(manager, fm)
    verify(manager, fm, planted)

@pytest.mark.parametrize("codec", [Codec.NONE, Codec.ZSTD])  # QEMU reads it; we feed it
@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("point", points("restore."))
def test_restore(manager: InstanceManager, data_root: Path, fm: str, point: str,
                 action: str, codec: Codec) -> None:
    planted = plant(manager, fm)
    run(manager.standby(fm, CompressionPolicy(codec=codec)))
    faulted(data_root, point, action, "restore", fm)
    settle(manager, action, point)
    running(manager, fm)
    verify(manager, fm, planted)
    # The consumed state is never loaded again: whatever the fault, the VM now runs
    # its newest state and a stop leaves it stopped, not "in standby" with old RAM.
    assert not manager.paths(fm).standby_dir.exists()


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("point", points("snapshot."))
def test_snapshot(manager: InstanceManager, data_root: Path, fm: str, point: str,
                  action: str) -> None:
    planted = plant(manager, fm)
    faulted(data_root, point, action, "snapshot", "create", fm, "--name", "sf")
    settle(manager, action, point)
    running(manager, fm)
    verify(manager, fm, planted)
    snaps = manager.snapshot_list(fm)
    if action == "error" or (action == "interrupt" and point != "snapshot.published"):
        assert snaps == []  # all or nothing (interrupted once published: all)
    for snap in snaps:  # a kill after publishing leaves a whole snapshot: it must fork
        infos = run(manager.snapshot_fork(snap.id, "sfk"))
        verify(manager, "sfk", planted)
        run(manager.delete(infos[0].name, force=True))
        run(manager.snapshot_delete(snap.id))


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("point", points("fork."))
def test_fork(manager: InstanceManager, data_root: Path, fm: str, point: str,
              action: str) -> None:
    planted = plant(manager, fm)
    faulted(data_root, point, action, "fork", fm, "fk")
    settle(manager, action, point)
    running(manager, fm)
    verify(manager, fm, planted)
    if action == "error" or (action == "interrupt" and point != "fork.restored"):
        assert "fk" not in manager.instance_names()  # all or nothing (interrupted once
        # every fork runs: all)
    if "fk" in manager.instance_names():  # a kill leaves the fork whole: it must run
        running(manager, "fk")
        verify(manager, "fk", planted)
        run(manager.delete("fk", force=True))
    assert manager.snapshot_list() == []  # the temporary snapshot is gone either way


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("point", points("delete."))
def test_delete(manager: InstanceManager, data_root: Path, fm: str, point: str,
                action: str) -> None:
    run(manager.fork(fm, "victim"))
    faulted(data_root, point, action, "delete", "--force", "victim")
    settle(manager, action, point)
    if "victim" in manager.instance_names():  # deleting again finishes the job
        run(manager.delete("victim", force=True))
    assert run(manager.check()) == []


@pytest.mark.parametrize("action", ["error", "kill"])  # a detached worker: no Ctrl-C
@pytest.mark.parametrize("point", points("compress."))
def test_compression_job(manager: InstanceManager, data_root: Path, fm: str, point: str,
                         action: str) -> None:
    planted = plant(manager, fm)
    env = {faults.ENV: f"{point}={action}"}  # the detached worker inherits it
    result = torpor_cli(data_root, "--local", "standby", fm, "--compress", "zstd",
                        "--background", env=env)
    assert result.returncode == 0, result.stderr
    wait_for_job(manager, fm)
    shown = run(manager.get(fm)).compression
    repaired: list[str] = []
    if action == "kill":  # the plan is orphaned: repair queues it again, without faults
        problems = run(manager.check(repair=True))
        assert "orphaned-plan" in {p.kind for p in problems}
        assert all(p.repaired for p in problems), problems
        repaired = sorted({p.kind for p in problems})
        wait_for_job(manager, fm)
    assert run(manager.check()) == []
    print(f"OUTCOME | {point} | {action} | compression {shown.state} |"
          f" {', '.join(repaired) or '-'}")
    running(manager, fm)
    verify(manager, fm, planted)


def kill_qemu_of(manager: InstanceManager, name: str) -> str:
    record = load_runtime(manager.paths(name))
    assert record is not None
    return f"kill -9 {record.identity.pid}"


@pytest.mark.parametrize("point", ["standby.paused", "snapshot.paused", "snapshot.frozen"])
def test_qemu_dies_mid_save(manager: InstanceManager, data_root: Path, fm: str,
                            point: str) -> None:
    planted = plant(manager, fm)
    argv = ["standby", fm] if point.startswith("standby") else [
        "snapshot", "create", fm, "--name", "sq"]
    result = torpor_cli(data_root, "--local", *argv, env={
        faults.ENV: f"{point}=exec", faults.EXEC_ENV: kill_qemu_of(manager, fm)})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("torpor: error: ")
    if point.startswith("snapshot"):  # the failed resume is said, not swallowed
        assert "could not be resumed" in result.stderr, result.stderr
    assert run(manager.get(fm)).state is InstanceState.CRASHED
    assert manager.snapshot_list(fm) == []
    problems = run(manager.check(repair=True))  # a crashed QEMU: cleared, disk kept
    assert "crashed" in {p.kind for p in problems}
    assert all(p.repaired for p in problems), problems
    running(manager, fm)
    verify(manager, fm, planted, ram_kept=False)


def test_qemu_dies_mid_load(manager: InstanceManager, data_root: Path, fm: str) -> None:
    planted = plant(manager, fm)
    run(manager.standby(fm))
    pidfile = manager.paths(fm).pidfile
    result = torpor_cli(data_root, "--local", "restore", fm, env={
        faults.ENV: "restore.spawned=exec", faults.EXEC_ENV: f"kill -9 $(cat {pidfile})"})
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert run(manager.get(fm)).state is InstanceState.STANDBY  # the state is kept
    assert run(manager.check()) == []
    running(manager, fm)
    verify(manager, fm, planted)


def test_check_finds_planted_debris_and_repair_leaves_running_vms_alone(
        manager: InstanceManager, data_root: Path, fm: str) -> None:
    planted = plant(manager, fm)
    paths = manager.paths(fm)
    (paths.standby_partial_dir).mkdir(parents=True)
    (paths.standby_partial_dir / "machine-state").write_bytes(b"half")
    creating = data_root / "snapshots" / ".creating-deadbeef0000@4000000-1"
    (creating / "payload").mkdir(parents=True)
    stale = paths.root / ".metadata.json.x1y2.tmp"
    stale.write_text("{")
    removing = paths.snapshots_dir / ".deleting-latest-4242"  # an older torpor's name
    (removing / "sub").mkdir(parents=True)
    in_progress = manager.data_root.staging(owned_name("create-abc"))  # ours: alive
    in_progress.mkdir(parents=True)
    try:
        found = torpor_cli(data_root, "check", "--json")
        assert found.returncode == 1, found.stderr
        problems = json.loads(found.stdout)["problems"]
        assert {(p["kind"], p["path"]) for p in problems} == {
            ("partial-standby", str(paths.standby_partial_dir)),
            ("partial-snapshot", str(creating)), ("stale-temp", str(stale)),
            ("deleting", str(removing))}
        assert not any(p["repaired"] for p in problems)
        repaired = torpor_cli(data_root, "check", "--repair", "--json")
        assert repaired.returncode == 0, repaired.stdout
        assert all(p["repaired"] for p in json.loads(repaired.stdout)["problems"])
        assert not paths.standby_partial_dir.exists() and not creating.exists()
        assert not stale.exists() and not removing.exists() and in_progress.exists()
        clean = torpor_cli(data_root, "check")
        assert clean.returncode == 0 and "no problems" in clean.stdout
        assert run(manager.get(fm)).state is InstanceState.RUNNING
        verify(manager, fm, planted)
    finally:
        in_progress.rmdir()


def test_resume_runs_a_vm_left_paused(manager: InstanceManager, data_root: Path,
                                      fm: str) -> None:
    planted = plant(manager, fm)
    run(pause(manager, fm))
    assert run(manager.get(fm)).state is InstanceState.PAUSED
    result = torpor_cli(data_root, "--local", "resume", fm)
    assert result.returncode == 0 and f"{fm} is running" in result.stdout, result.stderr
    verify(manager, fm, planted)
    again = torpor_cli(data_root, "--local", "resume", fm)
    assert again.returncode == 4 and "is running, not paused" in again.stderr


async def pause(manager: InstanceManager, name: str) -> None:
    async with Monitor.connect(manager.paths(name).qmp_socket) as mon:
        await mon.pause()


@pytest.mark.parametrize("point", ["restore.resumed", "restore.agent"])
def test_a_vm_dying_after_a_killed_restore_never_gets_its_old_ram_back(
        manager: InstanceManager, data_root: Path, fm: str, point: str) -> None:
    """Defect 1 of the sweep: the consumed state used to be removed only after `cont` and
    the agent. Killed in between, the VM ran with `latest/` still there; once the guest
    wrote to its disk and QEMU went away, the instance showed `standby` and a restore
    resumed the old RAM over the newer disk."""
    run(manager.standby(fm))
    faulted(data_root, point, "kill", "restore", fm)
    sh(manager, fm, "echo newer > /root/newer; sync")  # the disk moves on
    record = load_runtime(manager.paths(fm))
    assert record is not None
    record.process().kill()  # QEMU dies before any other command ran
    assert run(manager.get(fm)).state is InstanceState.CRASHED  # not standby
    with pytest.raises(WrongState):
        run(manager.restore(fm))
    run(manager.start(fm))  # a fresh boot on the newer disk
    assert sh(manager, fm, "cat /root/newer") == "newer\n"
    assert run(manager.check()) == []


def test_delete_leaves_no_job_files_of_the_instance(manager: InstanceManager, fm: str) -> None:
    """A deleted instance's `jobs/instance-<id>.*` used to stay forever."""
    run(manager.fork(fm, "jobs-gone"))
    run(manager.standby("jobs-gone", CompressionPolicy(codec=Codec.ZSTD, mode="background",
                                                       delay_s=600)))
    key = compression_jobs.instance_job_key(run(manager.get("jobs-gone")).id)
    assert compression_jobs.job_running(manager.data_root, key)
    run(manager.delete("jobs-gone", force=True))
    assert not list(manager.data_root.jobs_dir.glob(f"{key}.*"))
    assert run(manager.check()) == []


def test_a_silent_qemu_beside_its_saved_state_is_killed_and_the_state_restores(
        manager: InstanceManager, data_root: Path, fm: str) -> None:
    """Standby killed once its state is published: its QEMU (paused, the guest saved)
    outlives it. If that QEMU also stops answering, recovery kills it, as it would quit one
    that answered, and the restore goes on (it used to fail on the monitor instead)."""
    planted = plant(manager, fm)
    faulted(data_root, "standby.published", "kill", "standby", fm)
    record = load_runtime(manager.paths(fm))
    assert record is not None and record.identity.is_alive()
    os.kill(record.identity.pid, signal.SIGSTOP)
    try:
        assert run(manager.get(fm)).state is InstanceState.STANDBY
        run(manager.restore(fm))
        assert not record.identity.is_alive()
        verify(manager, fm, planted)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.identity.pid, signal.SIGCONT)
