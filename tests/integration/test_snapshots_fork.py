"""Stored snapshots and forks on real guests."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import booted, read_marks, run, sh, write_marks
from torpor.codec import Codec
from torpor.errors import WrongState
from torpor.hypervisor.blockfreeze import DiskFreeze, active_image
from torpor.hypervisor.qmp import Monitor
from torpor.hypervisor.vmconfig import drive_id
from torpor.instances import InstanceState
from torpor.instances.metadata import CompressionPolicy
from torpor.instances.runtime import load_runtime
from torpor.machinestate.stream import MigrationFailed
from torpor.manager import InstanceManager
from torpor.operations import snapshots as snapshots_module
from torpor.operations.legs import LegFailed

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def src(manager: InstanceManager) -> Iterator[str]:
    yield from booted(manager, "snapsrc")


async def qmp(manager: InstanceManager, name: str, command: str) -> object:
    async with Monitor.connect(manager.paths(name).qmp_query_socket) as mon:
        return await mon.execute(command)


def identity(manager: InstanceManager, name: str) -> tuple[str, str, str]:
    """(vmgenid, MAC QEMU filters on, MAC inside the guest)."""
    guid = run(qmp(manager, name, "query-vm-generation-id"))["guid"]  # type: ignore[index]
    mac = run(qmp(manager, name, "query-rx-filter"))[0]["main-mac"]  # type: ignore[index]
    return guid, mac, sh(manager, name, "cat /sys/class/net/eth0/address").strip()


async def guest_disk_file(manager: InstanceManager, name: str) -> Path:
    async with Monitor.connect(manager.paths(name).qmp_query_socket) as mon:
        return await active_image(mon, drive_id(0))


def no_leftovers(manager: InstanceManager, name: str) -> None:
    paths = manager.paths(name)
    assert not paths.standby_dir.exists() and not paths.standby_partial_dir.exists()
    assert not [p for p in manager.data_root.snapshots_dir.iterdir()
                if p.name.startswith(".")]
    # The disk freeze was folded back: the guest writes to disk.raw again.
    assert not paths.disk_overlay.exists()
    assert run(guest_disk_file(manager, name)) == paths.disk


def test_running_snapshot_then_fork_sees_data_as_of_the_pause(manager: InstanceManager,
                                                              src: str) -> None:
    marks = write_marks(manager, src)
    # Keep the guest writing to its disk (and RAM: the counter) while it is snapshotted.
    sh(manager, src, "(while :; do cat /run/counter >> /root/log; sync; done)"
                     " >/dev/null 2>&1 &")
    try:
        before = sh(manager, src, "cat /root/log").split()
        pid = run(manager.get(src)).pid
        record = run(manager.snapshot_create(src, "s1", {"purpose": "test"}))
        assert (record.kind, record.mode, record.tags) == ("running", "overlapped",
                                                          {"purpose": "test"})
        assert record.phases["paused_window"] > 0 and "legs" in record.phases
        assert "thaw" in record.phases  # the disk was frozen, copied, folded back
        after = run(manager.get(src))
        assert after.state is InstanceState.RUNNING and after.pid == pid  # source kept running
        no_leftovers(manager, src)
        sh(manager, src, "echo changed >> /tmp/ram.bin; echo changed >> /root/disk.bin")
        forks = run(manager.snapshot_fork("s1", "s1fork"))
        assert [f.state for f in forks] == [InstanceState.RUNNING]
        assert read_marks(manager, "s1fork") == marks  # as of the pause, not as of now
        # The disk was copied mid-write: the fork's log is readable, holds everything the
        # source had written before the snapshot, and is a monotonic counter record.
        fork_log = [int(v) for v in sh(manager, "s1fork", "cat /root/log").split()]
        assert fork_log[: len(before)] == [int(v) for v in before]
        assert fork_log == sorted(fork_log)
        src_id, fork_id = identity(manager, src), identity(manager, "s1fork")
        assert src_id[0] != fork_id[0]  # vmgenid
        assert src_id[1] != fork_id[1] and fork_id[1] == fork_id[2] == forks[0].mac
        assert sh(manager, "s1fork", "hostname").strip() == "s1fork"
        # The fork shares nothing writable: its writes do not reach the source.
        sh(manager, "s1fork", "echo fork-only > /root/fork.txt; sync")
        assert run(manager.exec(src, ["cat", "/root/fork.txt"])).exit_code != 0
        with pytest.raises(WrongState, match="forks depend on it"):
            run(manager.snapshot_delete("s1"))
        run(manager.delete("s1fork", force=True))
        run(manager.snapshot_delete("s1"))
        assert manager.snapshot_list(src) == []
    finally:
        sh(manager, src, "pkill -f 'cat /run/counter' || true")
        if "s1fork" in [i.name for i in run(manager.list_all())]:
            run(manager.delete("s1fork", force=True))
        for leftover in manager.snapshot_list(src):
            run(manager.snapshot_delete(leftover.id))


def test_sync_zstd_overlapped_snapshot_fork_restores_intact(manager: InstanceManager,
                                                            src: str) -> None:
    marks = write_marks(manager, src)
    record = run(manager.snapshot_create(src, "z1", compression=CompressionPolicy(
        codec=Codec.ZSTD)))
    assert record.state_codec is Codec.ZSTD and record.mode == "overlapped"
    forks = run(manager.snapshot_fork("z1", "zfork", target_state="standby"))
    assert forks[0].state is InstanceState.STANDBY
    latest = manager.paths("zfork").standby_dir
    assert (latest / "machine-state.zst").exists()
    run(manager.restore("zfork"))
    assert read_marks(manager, "zfork") == marks
    run(manager.delete("zfork", force=True))
    run(manager.snapshot_delete("z1"))


def test_injected_copy_failure_waits_for_save_and_leaves_nothing(
        manager: InstanceManager, src: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pid = run(manager.get(src)).pid

    def failing_copy(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(snapshots_module, "copy_tree", failing_copy)
    copy_leg_fails_and_source_runs_on(manager, src, pid)
    assert sh(manager, src, "echo alive") == "alive\n"


def copy_leg_fails_and_source_runs_on(manager: InstanceManager, src: str,
                                      pid: int | None) -> None:
    with pytest.raises(LegFailed) as info:
        run(manager.snapshot_create(src, "bad-copy"))
    assert info.value.leg == "copy" and "injected" in str(info.value)
    after = run(manager.get(src))
    assert after.state is InstanceState.RUNNING and after.pid == pid
    no_leftovers(manager, src)
    assert manager.snapshot_list(src) == []


def test_failure_copying_the_frozen_disk_after_resume_leaves_nothing(
        manager: InstanceManager, src: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk copy outlives the pause; its failure still leaves the source running on
    its own disk, with the guest's writes made meanwhile kept."""
    pid = run(manager.get(src)).pid
    real_copy_file = snapshots_module.copy_file

    def failing_disk_copy(src_path: Path, *args: object, **kwargs: object) -> object:
        if src_path == manager.paths(src).disk:
            # Fail once the source runs again (the copy leg started inside the pause),
            # after the guest wrote something that lands in the overlay.
            while run(qmp(manager, src, "query-status"))["status"] != "running":  # type: ignore[index]
                time.sleep(0.01)
            sh(manager, src, "echo during-copy > /root/during.txt; sync")
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real_copy_file(src_path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(snapshots_module, "copy_file", failing_disk_copy)
    copy_leg_fails_and_source_runs_on(manager, src, pid)
    # Written while the guest ran on the overlay, now in disk.raw: survives a restore.
    run(manager.standby(src))
    run(manager.restore(src))
    assert sh(manager, src, "cat /root/during.txt") == "during-copy\n"


def test_injected_save_failure_cancels_copy_and_leaves_nothing(
        manager: InstanceManager, src: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing_save(*args: object, **kwargs: object) -> None:
        await asyncio.sleep(0.05)
        raise MigrationFailed("migration failed: injected")

    monkeypatch.setattr(snapshots_module, "save_state", failing_save)
    with pytest.raises(LegFailed) as info:
        run(manager.snapshot_create(src, "bad-save"))
    assert info.value.leg == "save" and "injected" in str(info.value)
    assert run(manager.get(src)).state is InstanceState.RUNNING
    no_leftovers(manager, src)
    assert manager.snapshot_list(src) == []


def test_serial_mode_and_running_source_fork(manager: InstanceManager, src: str) -> None:
    record = run(manager.snapshot_create(src, "ser", serial=True))
    assert record.mode == "serial" and "save+copy" in record.phases
    run(manager.snapshot_delete("ser"))
    marks = write_marks(manager, src)
    forks = run(manager.fork(src, "rf", count=2))
    assert [f.name for f in forks] == ["rf-1", "rf-2"]
    assert len({f.mac for f in forks}) == 2
    for f in forks:
        assert read_marks(manager, f.name) == marks
        run(manager.delete(f.name, force=True))
    assert manager.snapshot_list(src) == []  # the fork's own snapshot is gone
    assert run(manager.get(src)).state is InstanceState.RUNNING


def test_stopped_and_standby_sources_and_snapshot_restore(manager: InstanceManager,
                                                          fresh_name: str) -> None:
    run(manager.create(fresh_name))
    try:
        stopped_fork = run(manager.fork(fresh_name, f"{fresh_name}-c", target_state="stopped"))
        assert stopped_fork[0].state is InstanceState.STOPPED
        fork_disk: Path = manager.paths(f"{fresh_name}-c").disk
        assert fork_disk.stat().st_ino != manager.paths(fresh_name).disk.stat().st_ino
        run(manager.delete(f"{fresh_name}-c"))
        run(manager.start(fresh_name))
        marks = write_marks(manager, fresh_name)
        run(manager.standby(fresh_name))
        run(manager.snapshot_create(fresh_name, "sb"))
        standby_fork = run(manager.fork(fresh_name, f"{fresh_name}-s"))
        assert read_marks(manager, f"{fresh_name}-s") == marks
        run(manager.delete(f"{fresh_name}-s", force=True))
        run(manager.restore(fresh_name))
        sh(manager, fresh_name, "echo later > /tmp/ram.bin; echo later > /root/disk.bin; sync")
        with pytest.raises(WrongState, match="stop it"):
            run(manager.snapshot_restore(fresh_name, "sb"))
        run(manager.stop(fresh_name))
        assert run(manager.snapshot_restore(fresh_name, "sb")).state is InstanceState.STANDBY
        run(manager.restore(fresh_name))
        assert read_marks(manager, fresh_name) == marks
        assert standby_fork[0].name == f"{fresh_name}-s"
    finally:
        for record in manager.snapshot_list(fresh_name):
            run(manager.snapshot_delete(record.id))
        run(manager.delete(fresh_name, force=True))


def test_snapshot_interrupted_while_frozen_is_folded_back(manager: InstanceManager,
                                                          fresh_name: str) -> None:
    """torpor killed between freeze and thaw: the next operation folds the overlay back,
    online while QEMU runs, with qemu-img after QEMU itself died."""
    run(manager.create(fresh_name))
    try:
        run(manager.start(fresh_name))
        paths = manager.paths(fresh_name)

        async def freeze_by_hand() -> None:
            async with Monitor.connect(paths.qmp_query_socket) as mon:
                await DiskFreeze(mon, drive_id(0), paths.disk_overlay).freeze()

        run(freeze_by_hand())
        sh(manager, fresh_name, "echo online > /root/online.txt; sync")
        assert run(guest_disk_file(manager, fresh_name)) == paths.disk_overlay
        run(manager.standby(fresh_name))  # the lock holder folds back first
        assert not paths.disk_overlay.exists()
        run(manager.restore(fresh_name))
        assert sh(manager, fresh_name, "cat /root/online.txt") == "online\n"

        run(freeze_by_hand())
        sh(manager, fresh_name, "echo offline > /root/offline.txt; sync")
        pid = run(manager.get(fresh_name)).pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        record = load_runtime(paths)
        assert record is not None and record.process().wait_exit(10)
        assert run(manager.get(fresh_name)).state is InstanceState.CRASHED
        run(manager.start(fresh_name))  # qemu-img commit, then boot
        assert not paths.disk_overlay.exists()
        assert sh(manager, fresh_name, "cat /root/offline.txt /root/online.txt") == \
            "offline\nonline\n"
    finally:
        run(manager.delete(fresh_name, force=True))
