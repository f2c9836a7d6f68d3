"""A QEMU started ahead of a restore: the daemon's restore pool (api/pool.py).

A memory-file instance in standby may have one QEMU already started for its restore:
launched with the instance's own command line, `-incoming defer` and its RAM file mapped
(so it cannot wait for just any instance: the file is mapped when QEMU creates the
board), and recorded in run/warm.json, not runtime.json, so the instance stays in
standby. Its restore claims it (`claim`: the QEMU becomes the instance's, recorded in
runtime.json) instead of starting one, which is most of a memory-file restore's time.
Every other operation on the instance discards it first (`discard`, from
Registry.locked). Whoever started it (the daemon) is its owner: while the owner lives it
is no stray for `torpor check`; once the owner is gone it is, and check kills it.
"""

from __future__ import annotations

import contextlib
from datetime import datetime

from pydantic import BaseModel

from torpor.fsutil import atomic_write_json, read_json
from torpor.hypervisor.process import ProcessIdentity, TrackedProcess
from torpor.hypervisor.vmconfig import VMConfig
from torpor.instances.metadata import utc_now
from torpor.instances.runtime import RuntimeRecord, clear_runtime, load_runtime, save_runtime
from torpor.machinestate.manifest import FileIdentity
from torpor.paths import InstancePaths


class WarmRecord(BaseModel):
    identity: ProcessIdentity
    owner: ProcessIdentity  # the process that started it and cleans it up (the daemon)
    requested: VMConfig  # what a restore must want to claim it
    launched: VMConfig  # what it runs (network attached): the runtime record's
    memory: FileIdentity  # the RAM file it maps: a restore must find that very file
    launched_at: datetime


def load(paths: InstancePaths) -> WarmRecord | None:
    try:
        return WarmRecord.model_validate(read_json(paths.warm_record))
    except (FileNotFoundError, ValueError):
        return None


def save(paths: InstancePaths, record: WarmRecord) -> None:
    atomic_write_json(paths.warm_record, record.model_dump(mode="json"))


def claim(paths: InstancePaths, config: VMConfig) -> TrackedProcess | None:
    """The waiting QEMU made the instance's own, if there is one that fits `config` and
    the RAM file as it is now; otherwise it is killed and None returned (the caller starts
    one). The record goes first: a kill right after leaves an unrecorded QEMU, a stray
    `check` kills, and the standby state untouched."""
    record = load(paths)
    if record is None:
        return None
    paths.warm_record.unlink()
    process = TrackedProcess(record.identity)
    if not (record.requested == config and maps_current_memory(record)
            and process.is_alive()):
        process.kill()
        return None
    # Launched, as far as the instance is concerned, now: the daemon's idle clock counts
    # from a QEMU's launch, and this one may have waited for hours.
    save_runtime(paths, RuntimeRecord(identity=record.identity, vm_config=record.launched,
                                      launched_at=utc_now()))
    return process


def discard(paths: InstancePaths) -> bool:
    """Kill the instance's waiting QEMU, if it has one; True if it had."""
    record = load(paths)
    if record is None:
        return False
    TrackedProcess(record.identity).kill()
    with contextlib.suppress(FileNotFoundError):
        paths.warm_record.unlink()
    if load_runtime(paths) is None:
        clear_runtime(paths)  # its sockets and pidfile: the instance has no QEMU now
    return True


def maps_current_memory(record: WarmRecord) -> bool:
    """Whether the RAM file the QEMU maps is still the instance's (a background job that
    compressed it replaced it: the QEMU then holds a deleted file's space)."""
    memory = record.requested.memory_file
    try:
        return memory is not None and FileIdentity.of(memory.path) == record.memory
    except FileNotFoundError:
        return False


def owned_alive(paths: InstancePaths) -> WarmRecord | None:
    """The waiting QEMU's record if the QEMU and its owner both live (not a stray)."""
    record = load(paths)
    if record is None or not record.owner.is_alive() or not record.identity.is_alive():
        return None
    return record
