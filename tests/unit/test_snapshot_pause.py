"""The paused window of a running-source snapshot, with QEMU and the copies faked: the VM
resumes once the state is saved and the disk frozen (not when the disk copy ends); the
failure rules hold across the resume; the disk is folded back after both legs, on every
path. (The real-guest tests in tests/integration/test_snapshots_fork.py cover the same
paths on QEMU.)"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from torpor.copy import CopyCancelled, CopyReport
from torpor.instances.metadata import CompressionPolicy
from torpor.instances.record import PhaseRecorder
from torpor.operations import snapshots
from torpor.operations.legs import LegFailed
from torpor.paths import InstancePaths, SnapshotPaths


class Scenario:
    """Records what happened, in order; each fake fails when told to."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.fail: set[str] = set()
        # Events, not durations, order the legs: the save ends once the small files are
        # copied (or the freeze failed); the disk copy ends only once the VM has resumed
        # (or it is cancelled), which is what "the copy outlives the pause" means.
        self.small_files_done = threading.Event()
        self.disk_copy_started = threading.Event()
        self.resumed = threading.Event()

    def log(self, event: str) -> None:
        self.events.append(event)

    def before(self, first: str, second: str) -> bool:
        return self.events.index(first) < self.events.index(second)


class FakeMonitor:
    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario

    async def set_migration_parameters(self, **_: Any) -> None:
        pass

    async def set_migration_capabilities(self, **_: Any) -> None:
        pass

    async def status(self) -> str:
        return "running"

    async def pause(self) -> None:
        self.scenario.log("pause")

    async def resume(self) -> None:
        self.scenario.log("resume")
        self.scenario.resumed.set()


@pytest.fixture
def scenario(monkeypatch: pytest.MonkeyPatch) -> Iterator[Scenario]:
    s = Scenario()

    @contextlib.asynccontextmanager
    async def connect(path: Path, timeout: float = 5.0) -> AsyncIterator[FakeMonitor]:
        yield FakeMonitor(s)

    class FakeFreeze:
        def __init__(self, mon: object, device: str, overlay: Path) -> None:
            self.frozen = False

        async def freeze(self) -> None:
            if "freeze" in s.fail:
                s.small_files_done.set()  # nothing will be copied: the save may end
                raise OSError("cannot create the overlay (injected)")
            self.frozen = True
            s.log("freeze")

        async def thaw(self) -> None:
            if self.frozen:
                s.log("thaw")

    async def save_leg(*_: object) -> str:
        await asyncio.to_thread(s.small_files_done.wait)
        if "save" in s.fail:
            await asyncio.to_thread(s.disk_copy_started.wait)  # fails during the disk copy
            s.log("save failed")
            raise RuntimeError("migration failed (injected)")
        s.log("saved")
        return "manifest"

    def copy_tree(*_: object, **__: object) -> CopyReport:
        s.log("small files copied")
        s.small_files_done.set()
        return CopyReport(files_sparse=1)

    def copy_file(*_: object, cancel: threading.Event, **__: object) -> CopyReport:
        s.disk_copy_started.set()
        while not s.resumed.is_set():  # a long copy: it ends after the resume, or never
            if cancel.wait(0.005):
                s.log("disk copy cancelled")
                raise CopyCancelled("cancelled")
        if "disk copy" in s.fail:
            s.log("disk copy failed")
            raise OSError(5, "Input/output error (injected)")
        s.log("disk copied")
        return CopyReport(files_sparse=1)

    monkeypatch.setattr(snapshots.Monitor, "connect", connect)
    monkeypatch.setattr(snapshots, "DiskFreeze", FakeFreeze)
    monkeypatch.setattr(snapshots, "save_leg", save_leg)
    monkeypatch.setattr(snapshots, "copy_tree", copy_tree)
    monkeypatch.setattr(snapshots, "copy_file", copy_file)
    yield s


def pause_once(tmp_path: Path) -> tuple[Any, PhaseRecorder]:
    root = tmp_path / "instance"
    root.mkdir()
    ctx = SimpleNamespace(paths=InstancePaths(root), name="fake")
    qemu = SimpleNamespace(is_alive=lambda: True)
    record = SimpleNamespace(vm_config=SimpleNamespace(memory_file=None), process=lambda: qemu)
    op = PhaseRecorder("snapshot", "fake")
    staging = SnapshotPaths(tmp_path / ".creating-x")
    result = asyncio.run(snapshots._overlapped_pause(
        ctx, record, staging, False, CompressionPolicy(), op))  # type: ignore[arg-type]
    return result, op


def failed_leg(tmp_path: Path) -> LegFailed:
    with pytest.raises(LegFailed) as info:
        pause_once(tmp_path)
    return info.value


def test_resume_comes_before_the_disk_copy_ends(scenario: Scenario, tmp_path: Path) -> None:
    (manifest, report), op = pause_once(tmp_path)
    assert manifest == "manifest" and report.files_sparse == 2
    assert scenario.events == ["pause", "freeze", "small files copied", "saved", "resume",
                               "disk copied", "thaw"]
    assert "paused_window" in op.phases


def test_copy_failing_before_the_freeze_still_waits_for_the_save(
        scenario: Scenario, tmp_path: Path) -> None:
    scenario.fail.add("freeze")
    failure = failed_leg(tmp_path)
    assert failure.leg == "copy" and "injected" in str(failure)
    assert scenario.events == ["pause", "saved", "resume"]  # nothing frozen, nothing to thaw


def test_disk_copy_failing_after_resume_still_folds_back(scenario: Scenario,
                                                        tmp_path: Path) -> None:
    scenario.fail.add("disk copy")
    assert failed_leg(tmp_path).leg == "copy"
    assert scenario.before("resume", "disk copy failed")
    assert scenario.events[-1] == "thaw"


def test_save_failure_cancels_the_disk_copy_resumes_and_folds_back(
        scenario: Scenario, tmp_path: Path) -> None:
    scenario.fail.add("save")
    failure = failed_leg(tmp_path)
    assert failure.leg == "save" and "injected" in str(failure)
    assert scenario.before("save failed", "disk copy cancelled")
    assert scenario.before("disk copy cancelled", "resume")  # both legs ended first
    assert scenario.events[-2:] == ["resume", "thaw"]
