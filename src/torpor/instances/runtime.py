"""The running side of an instance: which QEMU process is its, and what state it is in.

runtime.json (in run/) is written right after QEMU has started and removed once torpor
has stopped it. State is derived from what exists:
  process alive      → ask QEMU (query monitor): running / paused / crashed; with a
                       standby state present and QEMU not running, standby (below);
                       no answer and no standby state: unresponsive (a hung QEMU)
  process gone       → standby snapshot present → standby
                       runtime.json still there (QEMU died behind our back) → crashed
                       otherwise → stopped
"""

from __future__ import annotations

import contextlib
import shutil
from datetime import datetime

from pydantic import BaseModel

from torpor.fsutil import atomic_write_json, read_json
from torpor.hypervisor.process import ProcessIdentity, TrackedProcess
from torpor.hypervisor.qmp import FAILED_STATES, PAUSED_STATES, Monitor, QmpError
from torpor.hypervisor.vmconfig import VMConfig
from torpor.instances.metadata import InstanceState
from torpor.paths import InstancePaths


class RuntimeRecord(BaseModel):
    identity: ProcessIdentity
    vm_config: VMConfig
    launched_at: datetime

    def process(self) -> TrackedProcess:
        return TrackedProcess(self.identity)


def load_runtime(paths: InstancePaths) -> RuntimeRecord | None:
    try:
        return RuntimeRecord.model_validate(read_json(paths.runtime))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a torn or foreign file: treat as no record (state: stopped/crashed)


def save_runtime(paths: InstancePaths, record: RuntimeRecord) -> None:
    atomic_write_json(paths.runtime, record.model_dump(mode="json"))


def clear_runtime(paths: InstancePaths) -> None:
    """Forget the process and remove its sockets: nothing stale is left in run/."""
    if paths.run_dir.exists():
        shutil.rmtree(paths.run_dir, ignore_errors=True)
    paths.run_dir.mkdir(parents=True, exist_ok=True)


def has_standby_state(paths: InstancePaths) -> bool:
    """latest/ is only ever made whole (renamed into place with its manifest), so its
    presence is the state, even if something removed the manifest since: such a state is
    refused by restore, never cold-booted over."""
    return paths.standby_dir.exists()


# How long a state query waits for QEMU's monitor: past it, a live QEMU is unresponsive.
QUERY_TIMEOUT = 2.0
# Before an operation's lock: an unresponsive QEMU is never refused there (its monitor may
# be busy with the operation holding the lock), so a longer wait would decide nothing.
PRE_LOCK_QUERY_TIMEOUT = 0.5


async def query_vm_status(paths: InstancePaths, timeout: float = QUERY_TIMEOUT) -> str | None:
    """QEMU's run state through the query monitor; None if it cannot be reached."""
    with contextlib.suppress(QmpError):
        async with Monitor.connect(paths.qmp_query_socket, timeout=timeout) as mon:
            return await mon.status()
    return None


def exit_code(paths: InstancePaths) -> int | None:
    """The code an image instance's main process exited with (its init wrote it)."""
    try:
        return int(paths.exit_status.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def main_process_exited(paths: InstancePaths, record: RuntimeRecord) -> bool:
    """The QEMU gone, and an exit code written while it ran: the guest powered off
    because its main process ended, which is a stop, not a crash."""
    try:
        written = paths.exit_status.stat().st_mtime
    except OSError:
        return False
    return written >= record.launched_at.timestamp() and exit_code(paths) is not None


async def derive_state(paths: InstancePaths, *, timeout: float = QUERY_TIMEOUT,
                       known_silent: bool = False
                       ) -> tuple[InstanceState, RuntimeRecord | None]:
    """The instance's state from its files and its QEMU's answer. `known_silent`: its
    QEMU has just failed to answer (recovery, under the same lock): not asked again."""
    record = load_runtime(paths)
    if record is not None and record.identity.is_alive():
        status = None if known_silent else await query_vm_status(paths, timeout)
        if status in FAILED_STATES:
            return InstanceState.CRASHED, record
        if status != "running" and has_standby_state(paths):
            # A standby published the state and its QEMU has not exited yet, or a restore's
            # QEMU is starting or loading the state it has not consumed: the guest has not
            # run since the state was saved, and recovery would make it standby. (Its
            # monitor may not answer meanwhile: that is not "running" either.)
            return InstanceState.STANDBY, None
        if status in PAUSED_STATES:
            return InstanceState.PAUSED, record
        if status is None:  # alive, yet no answer within query_vm_status's timeout
            return InstanceState.UNRESPONSIVE, record
        return InstanceState.RUNNING, record
    if has_standby_state(paths):
        return InstanceState.STANDBY, None
    if record is not None and main_process_exited(paths, record):
        return InstanceState.STOPPED, None  # an image's main process exited: it powered off
    if record is not None:
        return InstanceState.CRASHED, record
    return InstanceState.STOPPED, None
