"""A QEMU started ahead of a restore (operations/warm.py): claimed only if it fits the
restore's config and still maps the instance's RAM file, otherwise killed; discard kills
it; a dead owner makes it a stray. A real process stands in for the QEMU (what is tested
is the claim's rules, not QEMU)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor.hypervisor.process import ProcessIdentity, TrackedProcess
from torpor.hypervisor.vmconfig import MemoryFile, VMConfig
from torpor.instances.metadata import utc_now
from torpor.instances.runtime import load_runtime
from torpor.machinestate.manifest import FileIdentity
from torpor.operations import warm
from torpor.paths import DataRoot, InstancePaths


def config(paths: InstancePaths, memory_mib: int = 64) -> VMConfig:
    return VMConfig(name="t", cpus=1, memory_mib=memory_mib, kernel=Path("/k"),
                    mac="52:54:00:00:00:01", memory_file=MemoryFile(path=paths.memory_file),
                    qmp_socket=paths.qmp_socket, agent_socket=paths.agent_socket,
                    serial_log=paths.serial_log)


@pytest.fixture
def paths(tmp_path: Path) -> InstancePaths:
    paths = DataRoot(tmp_path).instance("abc")
    paths.run_dir.mkdir(parents=True)
    paths.memory_file.write_bytes(b"\0" * 4096)
    return paths


@pytest.fixture
def stand_in() -> Iterator[ProcessIdentity]:
    """A process in the waiting QEMU's place (reaped by us when killed)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    identity = ProcessIdentity.of(child.pid)
    assert identity is not None
    yield identity
    child.kill()
    child.wait()


def waiting(paths: InstancePaths, identity: ProcessIdentity, *,
            owner: ProcessIdentity | None = None, memory_mib: int = 64) -> None:
    me = ProcessIdentity.of(os.getpid())
    assert me is not None
    warm.save(paths, warm.WarmRecord(
        identity=identity, owner=owner or me, requested=config(paths, memory_mib),
        launched=config(paths, memory_mib), memory=FileIdentity.of(paths.memory_file),
        launched_at=utc_now()))


def gone(identity: ProcessIdentity) -> bool:
    """Killed: a zombie of ours counts as gone (is_alive)."""
    return not identity.is_alive()


def test_a_fitting_qemu_is_claimed_and_recorded_as_the_instances(
        paths: InstancePaths, stand_in: ProcessIdentity) -> None:
    waiting(paths, stand_in)
    assert warm.owned_alive(paths) is not None  # not a stray while its owner lives
    process = warm.claim(paths, config(paths))
    assert process is not None and process.identity == stand_in
    assert not paths.warm_record.exists()  # the record goes first
    record = load_runtime(paths)
    assert record is not None and record.identity == stand_in
    assert stand_in.is_alive()


@pytest.mark.parametrize("why", ["other config", "replaced RAM file", "RAM file gone"])
def test_a_qemu_that_does_not_fit_is_killed_not_claimed(
        paths: InstancePaths, stand_in: ProcessIdentity, why: str) -> None:
    waiting(paths, stand_in, memory_mib=128 if why == "other config" else 64)
    if why == "replaced RAM file":  # what a background job compressing it leaves
        replacement = paths.memory_file.with_name("memory.new")
        replacement.write_bytes(b"\0" * 4096)
        os.replace(replacement, paths.memory_file)
    elif why == "RAM file gone":
        paths.memory_file.unlink()
    assert warm.claim(paths, config(paths)) is None
    assert gone(stand_in)
    assert load_runtime(paths) is None and not paths.warm_record.exists()


def test_discard_kills_it_and_nothing_is_claimed_after(paths: InstancePaths,
                                                       stand_in: ProcessIdentity) -> None:
    waiting(paths, stand_in)
    assert warm.discard(paths)
    assert gone(stand_in)
    assert warm.claim(paths, config(paths)) is None
    assert not warm.discard(paths)  # nothing left to discard


def test_a_dead_owner_makes_it_a_stray(paths: InstancePaths, stand_in: ProcessIdentity) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = ProcessIdentity(pid=dead.pid, start_time=1)
    waiting(paths, stand_in, owner=owner)
    assert warm.owned_alive(paths) is None
    assert TrackedProcess(stand_in).is_alive()
