"""Memory-file mode on real guests: device-state standby, lazy restore, copy-on-write
forks that share their snapshot's RAM, isolation, and faults."""

from __future__ import annotations

import errno
import hashlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import EMPTY_MD5, mapped_bytes, run, running, sh, torpor_cli
from torpor import faults
from torpor.codec import Codec
from torpor.errors import IntegrityError, OperationFailed
from torpor.instances import InstanceState
from torpor.instances.metadata import CompressionPolicy
from torpor.instances.runtime import load_runtime
from torpor.instances.snapshotrecord import SnapshotInfo
from torpor.jobs import compression as compression_jobs
from torpor.machinestate.manifest import Manifest
from torpor.manager import InstanceManager
from torpor.operations import fork as fork_module
from torpor.operations import snapshots as snapshots_module
from torpor.operations.legs import LegFailed
from torpor.paths import InstancePaths

pytestmark = pytest.mark.qemu
MARKS = "md5sum /tmp/ram.bin /root/disk.bin"


@pytest.fixture(scope="module")
def created_filevm(manager: InstanceManager) -> Iterator[str]:
    run(manager.create("filevm", memory_bytes=512 << 20, memory_backing="file"))
    run(manager.start("filevm"))
    yield "filevm"
    run(manager.delete("filevm", force=True))


@pytest.fixture
def filevm(manager: InstanceManager, created_filevm: str) -> str:
    """The module's guest, running (a test that failed half-way may have left it
    otherwise: the next one starts from running, not from that failure)."""
    return running(manager, created_filevm)


def write_marks(manager: InstanceManager, name: str, mib: int = 64) -> str:
    out = sh(manager, name, f"dd if=/dev/urandom of=/tmp/ram.bin bs=1M count={mib}"
             " 2>/dev/null; dd if=/dev/urandom of=/root/disk.bin bs=1M count=4 2>/dev/null;"
             " sync; " + MARKS)
    assert EMPTY_MD5 not in out
    return out


def resident_bytes(path: Path) -> int:
    """Page-cache bytes of a file (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def file_hash(path: Path) -> str:
    digest = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def test_standby_saves_device_state_only_and_releases_the_ram(
        manager: InstanceManager, filevm: str) -> None:
    marks = write_marks(manager, filevm, mib=96)
    counter = int(sh(manager, filevm, "cat /run/counter"))
    paths = manager.paths(filevm)
    record = load_runtime(paths)
    assert record is not None
    info = run(manager.standby(filevm))
    assert info.state is InstanceState.STANDBY and info.pid is None
    assert not record.identity.is_alive()
    manifest = Manifest.load(paths.standby_dir)
    assert manifest.kind == "memory-file" and manifest.x_ignore_shared
    assert manifest.memory_file is not None and manifest.memory_file.size_bytes == 512 << 20
    assert manifest.state.stored_bytes < 4 << 20  # devices only; the 96 MiB stayed in RAM file
    assert manifest.memory_file.allocated_bytes >= 96 << 20
    assert resident_bytes(paths.memory_file) == 0  # flushed and dropped: the host has it back
    phases = info.last_operation.phases if info.last_operation else {}
    assert {"paused_window", "flush-memory", "drop-cache"} <= set(phases)
    # The window counts from QEMU's STOP event: the migration's set-up (a monitor round
    # trip, the guest still running) is part of `save` but not of the window. The phase
    # is recorded only where the window was counted from a STOP event.
    assert 0 < phases["ran_into_migration"] < phases["save"]

    info = run(manager.restore(filevm))
    assert info.state is InstanceState.RUNNING
    # Read back and mapped into QEMU before the restore returned (hypervisor/guestram.py):
    # the guest's first touches of its data take no page faults.
    assert info.pid is not None and info.last_operation is not None
    assert "read-back" in info.last_operation.phases
    allocated = paths.memory_file.stat().st_blocks * 512
    assert mapped_bytes(info.pid, paths.memory_file) >= 0.95 * allocated
    assert sh(manager, filevm, MARKS) == marks
    assert int(sh(manager, filevm, "cat /run/counter")) > counter


@pytest.mark.parametrize("point", ["standby.paused", "standby.saved"])
def test_a_failed_standby_leaves_the_vm_running_with_its_data(
        manager: InstanceManager, filevm: str, point: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Here the migration stops the VM itself (no `stop`): a failure before it began
    leaves the VM running, one after it completed has the VM resumed; either way nothing
    is saved and the guest goes on with its RAM and disk."""
    marks = write_marks(manager, filevm, mib=8)
    counter = int(sh(manager, filevm, "cat /run/counter"))
    monkeypatch.setenv(faults.ENV, f"{point}=error")
    with pytest.raises(OperationFailed, match=f"injected fault at {point}.*VM was resumed"):
        run(manager.standby(filevm))
    monkeypatch.delenv(faults.ENV)
    assert run(manager.get(filevm)).state is InstanceState.RUNNING
    assert not manager.paths(filevm).standby_dir.exists()
    assert sh(manager, filevm, MARKS) == marks
    # it runs on: its counter (a second apart) moves within a few seconds
    deadline = time.monotonic() + 10
    while int(sh(manager, filevm, "cat /run/counter")) <= counter:
        assert time.monotonic() < deadline, "the guest's counter stopped"
    sh(manager, filevm, "echo after > /root/after.txt; sync")  # its disk writable again
    assert sh(manager, filevm, "cat /root/after.txt") == "after\n"


def test_missing_memory_file_is_refused_and_the_state_kept(
        manager: InstanceManager, filevm: str) -> None:
    marks = write_marks(manager, filevm, mib=8)
    run(manager.standby(filevm))
    paths = manager.paths(filevm)
    aside = paths.root / "memory.aside"
    paths.memory_file.rename(aside)
    try:
        with pytest.raises(IntegrityError, match="memory file"):
            run(manager.restore(filevm))
        assert run(manager.get(filevm)).state is InstanceState.STANDBY
    finally:
        aside.rename(paths.memory_file)
    run(manager.restore(filevm))  # still restorable once the file is back
    assert sh(manager, filevm, MARKS) == marks


def test_copy_failure_in_a_file_mode_snapshot_leaves_the_source_running(
        manager: InstanceManager, filevm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_copy(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(snapshots_module, "copy_tree", failing_copy)
    with pytest.raises(LegFailed, match="injected"):
        run(manager.snapshot_create(filevm, "bad-copy"))
    assert run(manager.get(filevm)).state is InstanceState.RUNNING
    assert manager.snapshot_list(filevm) == []
    assert sh(manager, filevm, "echo alive") == "alive\n"


def test_forks_map_the_snapshot_ram_privately_and_stay_isolated(
        manager: InstanceManager, filevm: str) -> None:
    marks = write_marks(manager, filevm)
    snap = run(manager.snapshot_create(filevm, "fm-snap"))
    payload = manager.data_root.snapshot(snap.id).payload_instance()
    assert Manifest.load(payload.standby_dir).kind == "memory-file"
    stored = file_hash(payload.memory_file)

    forks = run(manager.snapshot_fork("fm-snap", "fmfork", count=2))
    names = [f.name for f in forks]
    try:
        for name in names:
            meta_paths = manager.paths(name)
            assert not meta_paths.memory_file.exists()  # no copy of the RAM at all
            assert sh(manager, name, MARKS) == marks
        # The fork and its source run at once; each writes over the same RAM file pages.
        everyone = [filevm, *names]
        for name in everyone:
            sh(manager, name, f"echo {name} > /tmp/who; dd if=/dev/urandom of=/tmp/ram.bin"
                              " bs=1M count=16 conv=notrunc 2>/dev/null")
        for name in everyone:
            assert sh(manager, name, "cat /tmp/who").strip() == name
        assert len({sh(manager, name, "md5sum /tmp/ram.bin") for name in everyone}) == 3
        assert file_hash(payload.memory_file) == stored  # never written through

        # A fork's own standby is a stream over its private mapping; it comes back intact.
        before = sh(manager, names[0], "md5sum /tmp/ram.bin; cat /tmp/who")
        run(manager.standby(names[0]))
        kind = Manifest.load(manager.paths(names[0]).standby_dir).kind
        assert kind == "stream"
        run(manager.restore(names[0]))
        assert sh(manager, names[0], "md5sum /tmp/ram.bin; cat /tmp/who") == before
        assert file_hash(payload.memory_file) == stored
    finally:
        for name in names:
            run(manager.delete(name, force=True))
    run(manager.snapshot_delete("fm-snap"))


def fork_base_records(manager: InstanceManager, name: str) -> list[SnapshotInfo]:
    """The automatic snapshots `name`'s memory-file forks map (fork-base-…)."""
    return [r for r in manager.snapshot_list(name) if r.name.startswith("fork-base-")]


def fork_bases(manager: InstanceManager, name: str) -> list[str]:
    return [r.id for r in fork_base_records(manager, name)]


def test_fork_of_a_running_file_mode_instance_keeps_a_base_until_the_last_fork(
        manager: InstanceManager, filevm: str) -> None:
    marks = write_marks(manager, filevm, mib=8)
    forks = run(manager.fork(filevm, "fmlive", count=2))
    bases = fork_base_records(manager, filevm)
    assert len(bases) == 1 and bases[0].tags["torpor.auto"] == "fork"
    assert sh(manager, forks[0].name, MARKS) == marks
    assert run(manager.get(filevm)).state is InstanceState.RUNNING
    run(manager.delete(forks[0].name, force=True))
    assert [r.id for r in manager.snapshot_list(filevm)] == [bases[0].id]  # one fork left
    run(manager.delete(forks[1].name, force=True))
    assert manager.snapshot_list(filevm) == []


def test_forks_of_an_unchanged_standby_source_share_one_base(
        manager: InstanceManager, filevm: str) -> None:
    marks = write_marks(manager, filevm, mib=8)
    run(manager.standby(filevm))
    forks = run(manager.fork(filevm, "fmwave", count=1))
    (base,) = fork_bases(manager, filevm)
    forks += run(manager.fork(filevm, "fmwave2", count=2))  # the first fork still maps it
    assert fork_bases(manager, filevm) == [base]
    for fork in forks:
        assert sh(manager, fork.name, f"hostname; {MARKS}") == f"{fork.name}\n{marks}"
    # Once the source has run, its next state is another: a fork of it needs a new base.
    run(manager.restore(filevm))
    run(manager.standby(filevm))
    forks += run(manager.fork(filevm, "fmwave3", count=1))
    assert len(fork_bases(manager, filevm)) == 2 and base in fork_bases(manager, filevm)
    for fork in forks:
        run(manager.delete(fork.name, force=True))
    assert manager.snapshot_list(filevm) == []


def test_a_kept_base_removed_before_the_fork_maps_it_is_made_anew(
        manager: InstanceManager, filevm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run(manager.standby(filevm))
    first = run(manager.fork(filevm, "fmgone", count=1))
    (stale,) = fork_base_records(manager, filevm)
    run(manager.delete(first[0].name, force=True))  # the base goes with its last fork
    assert manager.snapshot_list(filevm) == []
    # The race: the base was found kept, and its last fork deleted before this fork's copies.
    monkeypatch.setattr(fork_module, "kept_base", lambda *_: stale)
    (again,) = run(manager.fork(filevm, "fmgone2", count=1))
    (base,) = fork_bases(manager, filevm)
    assert base != stale.id
    assert sh(manager, again.name, "hostname").strip() == again.name
    run(manager.delete(again.name, force=True))
    assert manager.snapshot_list(filevm) == []


def digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def base_files(manager: InstanceManager, base_id: str) -> tuple[Path, Path]:
    payload = InstancePaths(manager.data_root.snapshot(base_id).payload)
    return payload.disk, payload.memory_file


def test_a_standby_source_links_its_fork_base_and_gets_copies_of_its_own_to_run(
        manager: InstanceManager, filevm: str) -> None:
    marks = write_marks(manager, filevm, mib=8)
    run(manager.standby(filevm))
    paths = manager.paths(filevm)
    inodes = [p.stat().st_ino for p in (paths.disk, paths.memory_file)]
    forks = run(manager.fork(filevm, "fmlink", count=2))
    (base,) = fork_bases(manager, filevm)
    # The base holds the source's very files: linked, not copied.
    assert [p.stat().st_ino for p in base_files(manager, base)] == inodes
    held = {p: digest(p) for p in base_files(manager, base)}
    # A fork left in standby maps the base's RAM file too: it has none of its own to miss.
    forks += run(manager.fork(filevm, "fmlinksb", target_state="standby"))
    assert fork_bases(manager, filevm) == [base]  # forking only reads: still linked
    assert [p.stat().st_nlink for p in (paths.disk, paths.memory_file)] == [2, 2]
    assert run(manager.check()) == []
    # To run, the source gets its own copies; it writes over its RAM and disk, and the
    # base and its forks keep theirs.
    run(manager.restore(filevm))
    for path in (paths.disk, paths.memory_file, *base_files(manager, base)):
        assert path.stat().st_nlink == 1, path
    write_marks(manager, filevm, mib=8)
    run(manager.standby(filevm))
    assert {p: digest(p) for p in base_files(manager, base)} == held
    run(manager.standby(forks[0].name))
    run(manager.restore(forks[0].name))  # maps the base's RAM file again
    for fork in forks:
        assert sh(manager, running(manager, fork.name), MARKS) == marks
        run(manager.delete(fork.name, force=True))
    assert manager.snapshot_list(filevm) == []


def test_forks_gone_before_the_source_runs_cost_it_no_copy(
        manager: InstanceManager, filevm: str) -> None:
    run(manager.standby(filevm))
    paths = manager.paths(filevm)
    inodes = [p.stat().st_ino for p in (paths.disk, paths.memory_file)]
    (fork,) = run(manager.fork(filevm, "fmbrief", count=1))
    run(manager.delete(fork.name, force=True))  # its base goes with it
    run(manager.restore(filevm))
    assert [p.stat().st_ino for p in (paths.disk, paths.memory_file)] == inodes


@pytest.mark.parametrize(("point", "action"), [
    ("unshare.copied", "error"), ("unshare.copied", "kill"), ("unshare.replaced", "kill")])
def test_a_restore_cut_short_while_the_source_takes_its_own_files_leaves_both_whole(
        manager: InstanceManager, data_root: Path, filevm: str, point: str,
        action: str) -> None:
    """Killed (or failing) while the source copies the files its base linked: the source
    restores with its data (its RAM file the old or the new one, which the manifest names
    as `replacing`); the base keeps what it held, whatever the source writes afterwards."""
    marks = write_marks(manager, filevm, mib=8)
    run(manager.standby(filevm))
    (fork,) = run(manager.fork(filevm, "fmcut", count=1))
    (base,) = fork_bases(manager, filevm)
    held = {p: digest(p) for p in base_files(manager, base)}
    result = torpor_cli(data_root, "--local", "restore", filevm,
                        env={faults.ENV: f"{point}={action}"})
    if action == "kill":
        assert result.returncode == -9, result.stderr
        problems = run(manager.check(repair=True))
        assert all(p.repaired for p in problems), problems
    else:
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip() == f"torpor: error: injected fault at {point}"
    assert run(manager.check()) == []
    assert run(manager.get(filevm)).state is InstanceState.STANDBY
    run(manager.restore(filevm))
    paths = manager.paths(filevm)
    assert [p.stat().st_nlink for p in (paths.disk, paths.memory_file)] == [1, 1]
    assert sh(manager, filevm, MARKS) == marks
    write_marks(manager, filevm, mib=8)
    run(manager.standby(filevm))
    assert {p: digest(p) for p in base_files(manager, base)} == held
    assert sh(manager, fork.name, MARKS) == marks
    run(manager.delete(fork.name, force=True))
    assert manager.snapshot_list(filevm) == []


def test_stop_discards_the_ram_file_and_start_boots_afresh(
        manager: InstanceManager, filevm: str) -> None:
    paths = manager.paths(filevm)
    run(manager.stop(filevm))
    assert not paths.memory_file.exists()
    run(manager.start(filevm))
    assert paths.memory_file.stat().st_size == 512 << 20
    assert sh(manager, filevm, "test -e /tmp/ram.bin || echo fresh") == "fresh\n"


def test_background_compression_of_the_ram_file_keeps_its_holes(
        manager: InstanceManager, filevm: str) -> None:
    marks = write_marks(manager, filevm, mib=32)
    paths = manager.paths(filevm)
    policy = CompressionPolicy(codec=Codec.ZSTD, mode="background")
    info = run(manager.standby(filevm, policy))
    before = Manifest.load(paths.standby_dir).memory_file
    assert before is not None
    deadline = time.monotonic() + 120
    while run(manager.get(filevm)).compression.state != "compressed":
        assert time.monotonic() < deadline, run(manager.get(filevm)).compression
        time.sleep(0.2)
    compressed = paths.memory_file.with_name("memory.zst")
    assert compressed.exists() and not paths.memory_file.exists()
    status = run(manager.get(filevm)).compression
    assert status.compressed_bytes and status.compressed_bytes < before.allocated_bytes
    assert info.state is InstanceState.STANDBY

    # What every reader does before QEMU maps the file: decompress, holes kept.
    compression_jobs.decompress_memory_file(paths)
    assert paths.memory_file.stat().st_size == 512 << 20 and not compressed.exists()
    allocated = paths.memory_file.stat().st_blocks * 512
    # Holes stay holes: never inflated towards the 512 MiB of written zeros. (It may come
    # out smaller than before: pages the guest touched but left zero become holes too.)
    assert 32 << 20 <= allocated <= 1.05 * before.allocated_bytes
    run(manager.restore(filevm))
    assert sh(manager, filevm, MARKS) == marks
