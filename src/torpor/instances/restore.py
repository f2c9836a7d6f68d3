"""Restore: start QEMU waiting for the saved state, load and verify it, resume.

A state that fails its checks is never resumed; a failed restore leaves the standby
snapshot untouched and restorable and no QEMU process behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from torpor.errors import IntegrityError, WrongState
from torpor.fsutil import remove_tree
from torpor.guest.agent import GuestAgent
from torpor.hypervisor.process import TrackedProcess
from torpor.hypervisor.qmp import Monitor
from torpor.hypervisor.vmconfig import VMConfig
from torpor.instances import compression_jobs, lifecycle, observe
from torpor.instances.context import InstanceContext
from torpor.instances.metadata import InstanceState
from torpor.instances.operation import OperationRecorder
from torpor.instances.runtime import derive_state
from torpor.instances.vmspec import vm_config_for
from torpor.snapshot.manifest import Manifest, locate_state_file
from torpor.snapshot.stream import load_state


def check_compatible(ctx: InstanceContext, manifest: Manifest) -> VMConfig:
    """The config to restore with, or IntegrityError naming what does not match."""
    config = vm_config_for(ctx.meta, ctx.paths, manifest.vm_config.accel)
    if config.guest_visible() != manifest.guest_visible:
        diff = {k: (manifest.guest_visible.get(k), v) for k, v in config.guest_visible().items()
                if manifest.guest_visible.get(k) != v}
        raise IntegrityError(f"saved state of {ctx.name} needs a different VM config: "
                             + ", ".join(f"{k} saved {a} now {b}" for k, (a, b) in diff.items()))
    return config


def check_memory_file(ctx: InstanceContext, config: VMConfig, manifest: Manifest) -> None:
    """The RAM a memory-file state (or a file-mode fork) maps must be there, whole."""
    memory = config.memory_file
    if memory is None:
        return
    try:
        size = memory.path.stat().st_size
    except FileNotFoundError:
        raise IntegrityError(f"the memory file of {ctx.name} is missing: {memory.path}") from None
    expected = manifest.memory_file.size_bytes if manifest.memory_file else size
    if size != expected or size != config.memory_mib << 20:
        raise IntegrityError(f"the memory file {memory.path} of {ctx.name} has {size} bytes;"
                             f" the saved state needs {expected}")


def check_state(name: str, state: InstanceState) -> None:
    if state is not InstanceState.STANDBY:
        raise WrongState(f"instance {name} has no standby state to restore (it is {state})")


AgentStep = Callable[[GuestAgent], Awaitable[None]]


async def restore(ctx: InstanceContext, then: AgentStep | None = None) -> OperationRecorder:
    """`then` runs on the agent connection restore waited on (a fork sets its identity
    there); it is part of the operation: if it fails, the restore fails."""
    started = time.monotonic()
    state, _ = await derive_state(ctx.paths)
    check_state(ctx.name, state)
    await asyncio.to_thread(compression_jobs.prepare_for_read, ctx)
    manifest = Manifest.load(ctx.paths.standby_dir)
    config = check_compatible(ctx, manifest)
    path, codec = locate_state_file(ctx.paths.standby_dir, manifest.state)
    if codec is not manifest.state.codec:
        raise IntegrityError(f"manifest says the state is {manifest.state.codec} but the file"
                             f" found is {path.name}")
    lifecycle.check_boot_files(ctx)
    check_memory_file(ctx, config, manifest)
    op = OperationRecorder("restore", ctx.name)
    process: TrackedProcess | None = None
    agent: GuestAgent | None = None  # closed on every path
    try:
        with op.phase("spawn"):
            process = await lifecycle.spawn(ctx, config, incoming=True)
        # Attached before the state is loaded, the agent's port stays "host connected"
        # (as the standby saved it): qemu-ga answers without its 100 ms retry sleep.
        agent = await GuestAgent.attach_early(ctx.paths.agent_socket)
        async with Monitor.connect(ctx.paths.qmp_socket) as mon:
            # Asked of the QEMU that will load the state: exact, and no extra process.
            version = await mon.version()
            if version != manifest.qemu_version:
                raise IntegrityError(f"saved state of {ctx.name} was written by QEMU "
                                     f"{manifest.qemu_version}; this host has {version}")
            with op.phase("load"):
                progress = observe.counter("load", manifest.state.stored_bytes)
                await load_state(mon, path, codec, manifest.state, progress,
                                 ignore_shared=manifest.x_ignore_shared)
            if agent is not None:
                agent.send_sync()  # waiting for the guest, not for `cont`'s reply
            with op.phase("resume"):
                await mon.resume()
        op.add("restore_to_running", time.monotonic() - started)
        with op.phase("agent-ready"):
            agent = await lifecycle.agent_ready(ctx, agent)
        op.add("restore_to_agent", time.monotonic() - started)  # what the user waits for
        if then is not None:
            await then(agent)
        await agent.close()
    except BaseException as exc:
        if agent is not None:
            await agent.close()
        if process is not None:
            await lifecycle.terminate(ctx, process)
        await op.persist(ctx.paths, exc)
        raise
    with op.phase("cleanup"):  # consumed: the VM has moved on from it
        await asyncio.to_thread(remove_tree, ctx.paths.standby_dir)
    await op.persist(ctx.paths)
    return op
