"""Exec: a command run in a running guest through its agent.

Not under the instance's lock: a command runs beside other operations on its VM (a
snapshot pauses the VM under it for a moment; a standby ends it). So it is bound to the
QEMU it started on (its runtime identity): the agent is given the settings' agent timeout
to answer (a guest on a loaded host, or one just restored under TCG, can take seconds),
and meanwhile a watcher checks, with no round trip to QEMU, whether the VM left running
in another request (a standby published, its QEMU gone or replaced). If it did, that is
the conflict to report (409), at once, not a broken agent after a timeout (502): CI's
soak test met an exec whose VM was stood by and restored while it waited for the agent.
"""

from __future__ import annotations

import asyncio

from torpor.errors import WrongState
from torpor.guest.agent import AgentError, GuestAgent
from torpor.guest.result import ExecResult
from torpor.hypervisor.process import ProcessIdentity
from torpor.instances.metadata import InstanceState
from torpor.instances.runtime import derive_state, has_standby_state, load_runtime
from torpor.instances.states import Action, require
from torpor.operations.registry import Registry
from torpor.paths import InstancePaths
from torpor.tasks import task_group, to_thread

# How often the watcher looks at the instance's files (a stat, a small JSON, /proc).
WATCH_INTERVAL = 0.2


async def exec_command(registry: Registry, name: str, argv: list[str], *,
                       input: bytes | None = None, timeout: float = 60.0) -> ExecResult:
    meta = await to_thread(registry.find, name)
    paths = registry.data_root.instance(meta.id)
    state, record = await derive_state(paths)
    require(Action.EXEC, name, state, locked=False)  # not locked: runs beside others
    assert record is not None  # running: a QEMU is recorded
    on = record.identity
    try:
        async with task_group() as group:
            watcher = group.create_task(_watch(name, paths, on))  # raising, it cancels us
            try:
                return await _run(paths, argv, input, timeout, registry.settings.agent_timeout)
            finally:
                watcher.cancel()
    except AgentError:
        left = await _left_running(name, paths, on)
        if left is not None:
            raise left from None
        raise


async def _run(paths: InstancePaths, argv: list[str], input: bytes | None, timeout: float,
               agent_timeout: float) -> ExecResult:
    async with GuestAgent.connect(paths.agent_pipe, timeout=agent_timeout) as agent:
        return await agent.exec(argv, input=input, timeout=timeout)


async def _watch(name: str, paths: InstancePaths, on: ProcessIdentity) -> None:
    """Raises WrongState once the VM the command started on no longer runs."""
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        left = await _left_running(name, paths, on, quick=True)
        if left is not None:
            raise left


async def _left_running(name: str, paths: InstancePaths, on: ProcessIdentity, *,
                        quick: bool = False) -> WrongState | None:
    """Why the VM whose QEMU is `on` is no longer running, or None. A published standby
    state counts even while its killed QEMU has not exited (it answers nothing then).
    `quick` (the watcher): QEMU is not asked, so a VM paused for a moment by a snapshot
    still runs; after the agent failed, QEMU is asked, and paused or crashed is the
    conflict too."""
    if has_standby_state(paths):
        return WrongState(f"instance {name} went standby during the command")
    now = load_runtime(paths)
    if now is not None and now.identity != on:
        return WrongState(f"instance {name} was stood by and restored, or restarted, in "
                          f"another request during the command")
    if now is not None and on.is_alive() and quick:
        return None
    state, _ = await derive_state(paths)
    if state is not InstanceState.RUNNING:
        return WrongState(f"instance {name} went {state} during the command")
    return None
