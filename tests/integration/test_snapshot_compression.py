"""Stored snapshots compressed by standby's rules, on a real guest: the instance's policy
applies when the request says nothing; `background` leaves the stored state to a job;
a fork taken before, during and after that job is intact; a killed job is re-queued by
the next manager; what cannot be honoured is refused and leaves nothing behind."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import booted, read_marks, run, throttled, torpor_cli, write_marks
from torpor import faults
from torpor.codec import Codec, checksum_file
from torpor.fsutil import read_json
from torpor.hypervisor.process import ProcessIdentity
from torpor.instances.context import Settings
from torpor.instances.info import CompressionState
from torpor.instances.metadata import CompressionPolicy
from torpor.jobs.compression import Subject, job_running, load_stats
from torpor.machinestate.manifest import Manifest
from torpor.manager import InstanceManager

pytestmark = pytest.mark.qemu
BACKGROUND = CompressionPolicy(codec=Codec.ZSTD, mode="background", delay_s=2)
AUTO = CompressionPolicy(codec=Codec.ZSTD, store_incompressible=True)


@pytest.fixture(scope="module")
def vm(manager: InstanceManager) -> Iterator[str]:
    yield from booted(manager, "snapz", memory=256 << 20)


@pytest.fixture
def background_policy(manager: InstanceManager, vm: str) -> Iterator[None]:
    """The instance's own policy says zstd in the background after 2 s."""
    run(manager.set_policy(vm, BACKGROUND))
    yield
    run(manager.set_policy(vm, None))


def state_of(manager: InstanceManager, snapshot_id: str) -> CompressionState:
    return manager.snapshot_get(snapshot_id).compression.state


def wait_for(manager: InstanceManager, snapshot_id: str, state: CompressionState,
             timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (now := state_of(manager, snapshot_id)) is not state:
        assert time.monotonic() < deadline, f"snapshot compression still {now}, not {state}"
        time.sleep(0.1)


def forked_marks(manager: InstanceManager, snapshot_id: str, name: str) -> str:
    """Fork the snapshot (running), read its RAM and disk marks, delete it."""
    run(manager.snapshot_fork(snapshot_id, name))
    try:
        return read_marks(manager, name)
    finally:
        run(manager.delete(name, force=True))


def stored_state_files(manager: InstanceManager, snapshot_id: str) -> list[str]:
    latest = manager.data_root.snapshot(snapshot_id).payload_instance().standby_dir
    return sorted(p.name for p in latest.glob("machine-state*"))


def job_worker(manager: InstanceManager, snapshot_id: str) -> ProcessIdentity:
    path = manager.data_root.job_worker(Subject.snapshot(snapshot_id).key)
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, "no worker started"
        time.sleep(0.02)
    return ProcessIdentity.model_validate(read_json(path))


def test_the_instance_policy_compresses_a_snapshot_in_the_background(
        manager: InstanceManager, vm: str, background_policy: None) -> None:
    marks = write_marks(manager, vm)
    snap = run(manager.snapshot_create(vm, "bg-policy"))  # the request says nothing
    try:
        assert snap.compression.state in (CompressionState.PENDING,
                                          CompressionState.COMPRESSING)
        assert stored_state_files(manager, snap.id) == ["machine-state"]  # saved raw
        # Before the job: a fork reads the raw state (the job waits, then goes on).
        assert forked_marks(manager, snap.id, "bgp-before") == marks
        assert state_of(manager, snap.id) is not CompressionState.NONE  # plan handed back
        wait_for(manager, snap.id, CompressionState.COMPRESSED)
        assert stored_state_files(manager, snap.id) == ["machine-state.zst"]
        latest = manager.data_root.snapshot(snap.id).payload_instance().standby_dir
        manifest = Manifest.load(latest)
        assert manifest.state.codec is Codec.ZSTD
        assert manifest.state.checksum == checksum_file(latest / "machine-state.zst").checksum
        shown = manager.snapshot_get(snap.id)
        assert shown.state_codec is Codec.ZSTD and shown.compression.algorithm == "zstd"
        assert shown.compression.compressed_bytes and shown.compression.raw_bytes
        assert shown.compression.compressed_bytes < shown.compression.raw_bytes
        # After the job: a fork loads the compressed state.
        assert forked_marks(manager, snap.id, "bgp-after") == marks
    finally:
        run(manager.snapshot_delete(snap.id))
    assert not manager.data_root.job_lock(Subject.snapshot(snap.id).key).exists()



def test_auto_saves_raw_in_the_pause_and_stores_frames(
        manager: InstanceManager, vm: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`auto` (sync): the pause writes the raw state, and the snapshot is compressed once
    the source runs again, before it is published: zstd frames, nothing else beside."""
    marks = write_marks(manager, vm, ram_mib=16)
    seen = tmp_path / "in-pause"
    staging = manager.data_root.root / "snapshots"
    monkeypatch.setenv(faults.ENV, "snapshot.saved=exec")  # the source is still paused
    monkeypatch.setenv(faults.EXEC_ENV, f"ls {staging}/.creating-*/state > {seen}")
    snap = run(manager.snapshot_create(vm, "auto", compression=AUTO))
    monkeypatch.delenv(faults.ENV)
    try:
        assert seen.read_text().split() == ["machine-state"]  # raw while paused
        assert stored_state_files(manager, snap.id) == ["machine-state.zst"]
        latest = manager.data_root.snapshot(snap.id).payload_instance().standby_dir
        state = Manifest.load(latest).state
        assert (state.codec, state.layout) == (Codec.ZSTD, "frames")
        assert state.stored_raw_chunks is not None and 0 < state.stored_raw_chunks < state.chunks
        assert state.checksum == checksum_file(latest / "machine-state.zst").checksum
        assert forked_marks(manager, snap.id, "auto-fork") == marks
    finally:
        run(manager.snapshot_delete(snap.id))

def test_a_fork_during_the_job_stops_it_and_the_job_goes_on_afterwards(
        manager: InstanceManager, vm: str) -> None:
    marks = write_marks(manager, vm, ram_mib=32)
    slow = throttled(manager, 4 << 20)  # still running at the fork; done in ~25 s after it
    preempted = load_stats(manager.data_root).preempted
    snap = run(slow.snapshot_create(vm, "bg-during", compression=CompressionPolicy(
        codec=Codec.ZSTD, mode="background")))
    try:
        wait_for(manager, snap.id, CompressionState.COMPRESSING)
        latest = manager.data_root.snapshot(snap.id).payload_instance().standby_dir
        deadline = time.monotonic() + 10
        while not list(latest.glob("*.tmp")):  # the job is writing
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert forked_marks(slow, snap.id, "bgd-fork") == marks
        assert load_stats(manager.data_root).preempted == preempted + 1
        assert job_running(manager.data_root, Subject.snapshot(snap.id).key)  # re-queued
        wait_for(manager, snap.id, CompressionState.COMPRESSED, timeout=300)
        assert not list(latest.glob("*.tmp"))
        assert forked_marks(manager, snap.id, "bgd-after") == marks
    finally:
        run(manager.snapshot_delete(snap.id))


def test_a_killed_job_is_requeued_by_the_next_manager(manager: InstanceManager,
                                                      vm: str) -> None:
    """What a daemon restart does: the plan is in the snapshot's record, so the next
    manager finds the job gone and queues it again."""
    marks = write_marks(manager, vm)
    slow = throttled(manager, 1 << 20)  # 1 MiB/s: still writing when it is killed
    snap = run(slow.snapshot_create(vm, "bg-killed", compression=CompressionPolicy(
        codec=Codec.LZ4, mode="background")))
    try:
        wait_for(manager, snap.id, CompressionState.COMPRESSING)
        os.kill(job_worker(manager, snap.id).pid, signal.SIGKILL)
        key = Subject.snapshot(snap.id).key
        deadline = time.monotonic() + 10
        while job_running(manager.data_root, key):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        fresh = InstanceManager(manager.data_root.root, Settings(accel=manager.settings.accel))
        assert fresh.recover_jobs() == [f"snapshot bg-killed of {vm}: re-queued"]
        wait_for(manager, snap.id, CompressionState.COMPRESSED)
        assert stored_state_files(manager, snap.id) == ["machine-state.lz4"]
        assert forked_marks(manager, snap.id, "bgk-fork") == marks
    finally:
        run(manager.snapshot_delete(snap.id))


def test_what_cannot_be_honoured_is_refused_and_leaves_nothing(
        manager: InstanceManager, data_root: object, vm: str) -> None:
    snapshots_before = manager.snapshot_list()
    run(manager.create("snapz-stopped", memory_bytes=128 << 20))
    try:
        stopped = torpor_cli(manager.data_root.root, "--local", "snapshot", "create",
                             "snapz-stopped", "--compress", "zstd")
        assert stopped.returncode == 2 and "no machine state to compress" in stopped.stderr
        run(manager.standby(vm))
        try:
            sync = torpor_cli(manager.data_root.root, "--local", "snapshot", "create", vm,
                              "--compress", "zstd")
            assert sync.returncode == 7 and "--background" in sync.stderr, sync.stderr
        finally:
            run(manager.restore(vm))
    finally:
        run(manager.delete("snapz-stopped"))
    assert manager.snapshot_list() == snapshots_before
    assert not [p for p in manager.data_root.snapshots_dir.iterdir() if p.name.startswith(".")]


def test_a_memory_file_snapshot_keeps_its_ram_compressed_until_a_fork_maps_it(
        manager: InstanceManager) -> None:
    """Memory-file mode: the job compresses the payload's RAM file (holes kept); a fork
    needs it raw to map it, so the fork decompresses it and the plan is not handed back:
    compressing it again would take the file the fork maps."""
    name = "snapzf"
    run(manager.create(name, memory_bytes=256 << 20, memory_backing="file"))
    try:
        run(manager.start(name))
        marks = write_marks(manager, name)
        snap = run(manager.snapshot_create(name, "mf", compression=CompressionPolicy(
            codec=Codec.ZSTD, mode="background")))
        payload = manager.data_root.snapshot(snap.id).payload_instance()
        wait_for(manager, snap.id, CompressionState.COMPRESSED)
        assert not payload.memory_file.exists()
        assert payload.memory_file.with_name("memory.zst").exists()
        run(manager.snapshot_fork(snap.id, "snapzf-fork"))
        try:
            assert read_marks(manager, "snapzf-fork") == marks
            assert payload.memory_file.exists()  # raw again: the fork maps it
            assert state_of(manager, snap.id) is CompressionState.NONE
            assert not job_running(manager.data_root, Subject.snapshot(snap.id).key)
        finally:
            run(manager.delete("snapzf-fork", force=True))
        run(manager.snapshot_delete(snap.id))
    finally:
        run(manager.delete(name, force=True))
