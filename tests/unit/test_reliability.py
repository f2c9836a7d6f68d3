"""Fault points, the readers' file rules, debris ownership and the worker hand-over,
on real files and processes (no QEMU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.unit.test_compression_jobs import NOW, standby_instance
from torpor import faults
from torpor.codec import Codec
from torpor.errors import IntegrityError, InvalidArgument
from torpor.fsutil import owned_name, parse_owner, remove_tree
from torpor.jobs import compression as compression_jobs
from torpor.jobs.compression import Subject
from torpor.jobs.worker import Job
from torpor.machinestate.manifest import (
    FileIdentity,
    Manifest,
    MemoryFileRecord,
    locate_state_file,
    sample_pages,
    verify_memory_file,
)
from torpor.paths import DataRoot


def test_fault_points_do_nothing_unless_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.point("standby.saved")
    monkeypatch.setenv(faults.ENV, "standby.saved=error")
    faults.point("standby.paused")  # another point: nothing
    with pytest.raises(faults.InjectedFault, match=r"injected fault at standby\.saved"):
        faults.point("standby.saved")
    monkeypatch.setenv(faults.ENV, "standby.savd=error")  # a typo is an error, not a no-op
    with pytest.raises(InvalidArgument, match=r"standby\.savd"):
        faults.point("standby.saved")


def test_kill_is_a_real_sigkill() -> None:
    env = dict(os.environ, **{faults.ENV: "delete.killed=kill"})
    code = "from torpor import faults; faults.point('delete.killed'); print('survived')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=False)
    assert result.returncode == -9 and "survived" not in result.stdout


def test_owner_tags_tell_debris_from_work(tmp_path: Path) -> None:
    name = owned_name("fork-abc")
    owner = parse_owner(name)
    assert owner is not None and owner[0] == os.getpid()
    assert parse_owner("fork-abc") is None and parse_owner("x@12-ab") is None
    tree = tmp_path / "t"
    (tree / "sub").mkdir(parents=True)
    remove_tree(tree)
    assert not tree.exists() and list(tmp_path.iterdir()) == []


# --- the files of a standby state: the manifest names the one to trust ---------------------

def _commit_steps(tmp_path: Path) -> tuple[DataRoot, Path, Path]:
    root, instance_id, _ = standby_instance(tmp_path, Codec.ZSTD, delay=0)
    directory = root.instance(instance_id).standby_dir
    return root, directory / "machine-state", directory / "machine-state.zst"


@pytest.mark.parametrize("stopped_at", ["compress.renamed", "compress.recorded"])
def test_a_job_killed_in_its_commit_leaves_a_readable_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopped_at: str) -> None:
    """Defect 3 of the sweep: killed between publishing the .zst and dropping the raw
    file, the next reader deleted the named .zst and then refused the state for good."""
    root, raw, zst = _commit_steps(tmp_path)
    job = Job(root, Subject.instance("abc123abc123"), slots=1, rate_limit=None, clock=lambda: NOW)
    monkeypatch.setenv(faults.ENV, f"{stopped_at}=error")
    import asyncio

    with pytest.raises(faults.InjectedFault):
        asyncio.run(job.run())
    paths = root.instance("abc123abc123")
    compression_jobs.tidy_standby(paths)  # what every reader does first
    manifest = Manifest.load(paths.standby_dir)
    path, codec = locate_state_file(paths.standby_dir, manifest.state)
    assert path.exists() and codec is manifest.state.codec
    assert [p.name for p in paths.standby_dir.iterdir() if "machine-state" in p.name] == [
        path.name]
    expected = raw if stopped_at == "compress.renamed" else zst
    assert path == expected


def test_a_named_file_that_is_missing_is_refused_by_name(tmp_path: Path) -> None:
    _, raw, _ = _commit_steps(tmp_path)
    directory = raw.parent
    manifest = Manifest.load(directory)
    manifest.state.codec = Codec.ZSTD  # names a file that is not there
    with pytest.raises(IntegrityError, match=r"names machine-state\.zst but only machine-state"):
        locate_state_file(directory, manifest.state)


def test_the_job_refuses_to_guess_on_a_corrupt_manifest(tmp_path: Path) -> None:
    root, raw, _ = _commit_steps(tmp_path)
    (raw.parent / "manifest.json").write_text("{not json")
    import asyncio

    job = Job(root, Subject.instance("abc123abc123"), slots=1, rate_limit=None, clock=lambda: NOW)
    outcome = asyncio.run(job.run())
    assert outcome.startswith("failed") and raw.exists()
    assert not (raw.parent / "machine-state.zst").exists()


# --- memory-file RAM: checked without reading it all ----------------------------------------

def _ram_file(tmp_path: Path) -> tuple[Path, MemoryFileRecord]:
    path = tmp_path / "memory"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
        for offset in (0, 5 << 20, 40 << 20):
            f.seek(offset)
            f.write(os.urandom(1 << 20))
    record = MemoryFileRecord(size_bytes=64 << 20, allocated_bytes=3 << 20,
                              identity=FileIdentity.of(path), samples=sample_pages(path))
    return path, record


def test_memory_file_check_refuses_a_replaced_or_rewritten_file(tmp_path: Path) -> None:
    path, record = _ram_file(tmp_path)
    assert len(record.samples) == 64 and all(s.offset % 4096 == 0 for s in record.samples)
    verify_memory_file(path, record)  # untouched: fine
    replacement = tmp_path / "zeros"
    with open(replacement, "wb") as f:
        f.truncate(64 << 20)  # right size, all zeros
    os.replace(replacement, path)
    with pytest.raises(IntegrityError, match="replaced or written to"):
        verify_memory_file(path, record)
    with pytest.raises(IntegrityError, match="does not hold the saved RAM"):
        verify_memory_file(path, record, same_file=False)  # a copy is judged by its pages


def test_memory_file_check_sees_a_write_in_place(tmp_path: Path) -> None:
    path, record = _ram_file(tmp_path)
    with open(path, "r+b") as f:
        f.seek(60 << 20)  # a page no sample covers: the change time still tells
        f.write(b"x")
    with pytest.raises(IntegrityError, match="replaced or written to"):
        verify_memory_file(path, record)


# --- the worker hand-over ---------------------------------------------------------------------

FAKE_WORKER = """
import fcntl, json, os, signal, sys, time
from pathlib import Path
lock, identity, go = sys.argv[1:4]
fd = os.open(lock, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
Path(identity + ".locked").touch()
while not Path(go).exists():
    time.sleep(0.005)
stat = Path(f"/proc/{os.getpid()}/stat").read_text()
start = int(stat[stat.rindex(")") + 2:].split()[19])
Path(identity).write_text(json.dumps({"pid": os.getpid(), "start_time": start}))
signal.pause()  # like a worker waiting for the instance lock its reader holds
"""


def test_cancel_reaches_a_worker_that_names_itself_after_the_reader_looked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadlock found by reading: the worker held its job lock before writing its
    identity; a reader that looked in that gap blocked on the lock forever while holding
    the instance lock the worker would wait for."""
    root = DataRoot(tmp_path)
    root.ensure()
    key = compression_jobs.instance_job_key("abc123abc123")
    go = tmp_path / "go"
    worker = subprocess.Popen([sys.executable, "-c", FAKE_WORKER, str(root.job_lock(key)),
                               str(root.job_worker(key)), str(go)])
    try:
        locked = Path(str(root.job_worker(key)) + ".locked")
        while not locked.exists():
            assert worker.poll() is None
        real = compression_jobs.worker_identity

        def looked(data_root: DataRoot, job: str) -> object:
            found = real(data_root, job)
            go.touch()  # the worker names itself only once the reader has looked
            return found

        monkeypatch.setattr(compression_jobs, "worker_identity", looked)
        done = threading.Event()
        thread = threading.Thread(target=lambda: (
            compression_jobs.cancel_and_wait(root, key, timeout=20), done.set()), daemon=True)
        thread.start()
        thread.join(30)
        assert done.is_set(), "cancel_and_wait never returned"
        assert worker.wait(5) == -15  # SIGTERM reached it
    finally:
        worker.kill()
        worker.wait()


def test_a_launched_job_counts_as_running_at_once(tmp_path: Path) -> None:
    root, instance_id, _ = standby_instance(tmp_path, Codec.ZSTD, delay=3600)
    key = compression_jobs.instance_job_key(instance_id)
    compression_jobs.launch_worker(root, Subject.instance(instance_id), slots=1, rate_limit=None)
    try:
        assert compression_jobs.job_running(root, key)  # no window for a sweep to misread
    finally:
        compression_jobs.cancel_and_wait(root, key)
    assert not compression_jobs.job_running(root, key)
    stats = json.loads(root.job_stats.read_text())
    assert stats["skipped"] == 1


def test_check_leaves_a_busy_instance_alone_and_never_takes_its_lock(tmp_path: Path) -> None:
    import asyncio
    import fcntl

    from torpor.operations import health

    root, instance_id, _ = standby_instance(tmp_path, Codec.ZSTD, delay=0)
    partial = root.instance(instance_id).standby_partial_dir
    partial.mkdir()
    lock = root.instance_lock(instance_id)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # an operation is under way on it
        kinds = {p.kind for p in asyncio.run(health.scan(root))}
        assert "partial-standby" not in kinds  # its half-done work is not debris
    finally:
        os.close(fd)
    kinds = {p.kind for p in asyncio.run(health.scan(root))}
    assert "partial-standby" in kinds


def test_check_finds_the_job_and_lock_of_a_deleted_snapshot(tmp_path: Path) -> None:
    import asyncio

    from torpor.instances.metadata import utc_now
    from torpor.instances.snapshotrecord import SnapshotRecord, save_record
    from torpor.operations import health

    root = DataRoot(tmp_path / "data")
    root.ensure()
    kept, gone = "a1b2c3d4e5f6", "0f0f0f0f0f0f"
    root.snapshot(kept).root.mkdir(parents=True)
    save_record(root.snapshot(kept), SnapshotRecord(
        id=kept, name="kept", source_id="ffffffffffff", source_name="vm", kind="stopped",
        mode="copy", created_at=utc_now()))
    for snapshot_id in (kept, gone):
        root.job_log(Subject.snapshot(snapshot_id).key).write_text("")
        root.snapshot_lock(snapshot_id).write_text("")
    problems = asyncio.run(health.scan(root))
    found = sorted((p.kind, Path(p.path).name, p.detail) for p in problems)
    assert found == [
        ("orphaned-job", f"snapshot-{gone}.log", "of a deleted snapshot"),
        ("orphaned-lock", f"snapshot-{gone}.lock", "of a deleted snapshot"),
    ]


def test_check_takes_an_instance_with_damaged_metadata_for_damaged_not_gone(
        tmp_path: Path) -> None:
    """Its metadata unreadable, the instance is reported (bad-metadata, never repaired);
    its lock, job file and leased address are still its own, not a deleted instance's
    (repair used to remove them, and release the address of a VM that may be running)."""
    import asyncio

    from torpor.fsutil import atomic_write_json
    from torpor.operations import health

    root = DataRoot(tmp_path / "data")
    root.ensure()
    damaged = "a1b2c3d4e5f6"
    paths = root.instance(damaged)
    paths.root.mkdir(parents=True)
    paths.metadata.write_text('{"torn')
    root.instance_lock(damaged).parent.mkdir(parents=True, exist_ok=True)
    root.instance_lock(damaged).write_text("")
    root.job_log(Subject.instance(damaged).key).write_text("")
    root.network_leases.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root.network_leases, {"10.77.0.2": damaged})
    problems = asyncio.run(health.scan(root))
    assert [(p.kind, p.path) for p in problems] == [("bad-metadata", str(paths.metadata))]
