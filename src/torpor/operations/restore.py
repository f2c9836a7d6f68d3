"""Restore: start QEMU waiting for the saved state, load and verify it, resume.

A state that fails its checks is never resumed; a restore failing before the guest runs
leaves the standby state untouched and restorable and no QEMU process behind.

The saved state is consumed *before* the guest runs: `latest/` is renamed to
`.latest.consumed` (durably) and only then is `cont` sent. Once the guest has run it may
have written to its disk, and its old RAM must never be resumed over that disk again; a
kill at any later point leaves a state no command will load (the next operation removes
it). A failure after `cont` therefore leaves the VM running, never killed and "restorable".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from torpor import faults
from torpor.codec import Codec
from torpor.errors import IntegrityError, OperationFailed, TorporError
from torpor.fsutil import fsync_dir, prefetch, remove_tree
from torpor.guest.agent import GuestAgent
from torpor.guest.identity import Applied, Identity
from torpor.hypervisor import guestram
from torpor.hypervisor.process import ProcessIdentity, TrackedProcess
from torpor.hypervisor.qmp import Monitor, QmpError
from torpor.hypervisor.vmconfig import DEFERRED, VMConfig
from torpor.instances import observe
from torpor.instances.context import InstanceContext
from torpor.instances.metadata import utc_now
from torpor.instances.record import PhaseRecorder
from torpor.instances.vmspec import vm_config_for
from torpor.jobs import compression as compression_jobs
from torpor.machinestate.manifest import (
    FileIdentity,
    Manifest,
    locate_state_file,
    verify_memory_file,
)
from torpor.machinestate.stream import (
    exec_feed,
    feeding,
    is_fed,
    load_state,
    reads_at_exec,
)
from torpor.operations import lifecycle, warm
from torpor.operations.guest_clock import ask_helper, cancel_helper, set_guest_clock
from torpor.paths import InstancePaths
from torpor.tasks import Reaper, in_thread, task_group, to_thread

log = logging.getLogger(__name__)


def check_compatible(ctx: InstanceContext, manifest: Manifest) -> VMConfig:
    """The config to restore with, or IntegrityError naming what does not match."""
    config = vm_config_for(ctx.meta, ctx.paths, manifest.vm_config.accel)
    saved = VMConfig.saved_guest_visible(manifest.guest_visible)
    if config.guest_visible() != saved:
        diff = {k: (saved.get(k), v) for k, v in config.guest_visible().items()
                if saved.get(k) != v}
        raise IntegrityError(f"saved state of {ctx.name} needs a different VM config: "
                             + ", ".join(f"{k} saved {a} now {b}" for k, (a, b) in diff.items()))
    return config


def check_memory_file(ctx: InstanceContext, config: VMConfig, manifest: Manifest) -> None:
    """The RAM a memory-file state (or a file-mode fork) maps must be there, whole, and
    the very file that was saved (identity and sampled pages: see MemoryFileRecord)."""
    memory = config.memory_file
    if memory is None:
        return
    if manifest.memory_file is not None:
        verify_memory_file(memory.path, manifest.memory_file)
        return
    try:  # a fork's own stream over its origin's RAM: the stream carries every page
        size = memory.path.stat().st_size
    except FileNotFoundError:
        raise IntegrityError(f"the memory file of {ctx.name} is missing: {memory.path}") from None
    if size != config.memory_mib << 20:
        raise IntegrityError(f"the memory file {memory.path} of {ctx.name} has {size} bytes;"
                             f" the saved state needs {config.memory_mib << 20}")


@dataclass
class _Incoming:
    """What a restore has started so far: its QEMU and its agent connection."""

    process: TrackedProcess | None = None
    agent: GuestAgent | None = None
    resumed: bool = False  # `cont` took effect, whatever became of its answer


async def restore(ctx: InstanceContext, reaper: Reaper) -> PhaseRecorder:
    async with restored(ctx, reaper) as done:
        return done.op


@dataclass
class Restored:
    agent: GuestAgent  # the connection the restore waited on
    op: PhaseRecorder
    identity_applied: bool  # the identity asked for is set (by the guest's helper)


@dataclass
class _Saved:
    """The standby state as a restore found and checked it."""

    manifest: Manifest
    config: VMConfig  # the VM to start for it
    path: Path  # the state file
    codec: Codec


@contextlib.asynccontextmanager
async def restored(ctx: InstanceContext, reaper: Reaper,
                   identity: Identity | None = None) -> AsyncIterator[Restored]:
    """The instance restored and running, for the block (a fork sets its identity there,
    unless the guest's helper did: `identity`, asked of it with the clock). The block is
    part of the operation: if it fails, the restore fails (the VM runs). The caller holds
    the lock (standby). The loaded state goes to `reaper` once the guest runs."""
    started = time.monotonic()
    saved = await _checked_state(ctx)
    op = PhaseRecorder("restore", ctx.name)
    vm = await _load_and_resume(ctx, op, saved)
    op.add("restore_to_running", time.monotonic() - started)
    # The guest's identity helper is asked at once: it sets the clock (and a fork's
    # identity) while the agent wakes, with no process started in the guest.
    helper = ask_helper(saved.config, ctx.settings.agent_timeout, identity)
    memory = saved.config.memory_file
    assert vm.process is not None
    pid = vm.process.pid
    try:
        async with task_group() as tasks:
            # The guest runs: the state it was loaded from is garbage whatever happens
            # next. Here it goes while the guest wakes, not after (removing a 300 MB
            # state took 65-80 ms of the call); a running reaper (the daemon's) takes it
            # once the record is written, below.
            discard = (None if reaper.active else
                       tasks.create_task(reaper.remove(ctx.paths.standby_consumed_dir)))
            faults.point("restore.resumed")
            with op.phase("agent-ready"):
                vm.agent = await lifecycle.agent_ready(ctx, vm.agent)
                applied = await set_guest_clock(vm.agent, op, helper)
            op.add("restore_to_agent", time.monotonic() - started)  # what the user waits for
            if memory is not None:
                # Memory-file mode: the guest faults its RAM in from the file, which
                # standby dropped from the page cache. Once the agent has answered, the
                # rest is read back and mapped into QEMU (_read_back). Not while the guest
                # wakes: the readahead queued ahead of the guest's own reads (a 2 GiB
                # half-full guest's agent answered after 0.88 s instead of 0.20) and
                # mapping then delayed it too.
                with op.phase("read-back"):
                    await in_thread(lambda stop: _read_back(memory.path, pid, stop))
            yield Restored(vm.agent, op, applied and identity is not None)
            await vm.agent.close()
            faults.point("restore.agent")
            if discard is not None:
                with op.phase("cleanup"):  # what is left of the removal
                    await discard
    except BaseException as exc:
        failure = await _failed_running(ctx, reaper, vm, op, helper, exc)
        if not isinstance(exc, Exception):  # cancelled (Ctrl-C): that goes on, recorded
            raise
        raise failure from exc
    await op.persist(ctx.paths)
    # The daemon's reaper gets the state after the record (in-process it is gone already):
    # on a filesystem mounted with `discard` (this host's ext4) an fsync waits for the
    # discards of blocks freed before it, and a large removal running alongside made the
    # record's fsync take 33-50 ms instead of 1-2.
    await reaper.remove(ctx.paths.standby_consumed_dir)


async def _checked_state(ctx: InstanceContext) -> _Saved:
    """The standby state, refused before anything starts if it cannot be restored here:
    a VM config it does not fit, a missing state file, kernel or RAM file."""
    await to_thread(compression_jobs.prepare_for_read, ctx)
    manifest = Manifest.load(ctx.paths.standby_dir)
    config = check_compatible(ctx, manifest)
    path, codec = locate_state_file(ctx.paths.standby_dir, manifest.state)
    lifecycle.check_boot_files(ctx)
    check_memory_file(ctx, config, manifest)
    return _Saved(manifest, config, path, codec)


async def _load_and_resume(ctx: InstanceContext, op: PhaseRecorder, saved: _Saved
                           ) -> _Incoming:
    """QEMU started, the state loaded and verified, consumed, and the guest resumed. On a
    failure before the guest runs, the QEMU is killed and the state stays (standby)."""
    vm = _Incoming()
    try:
        async with contextlib.AsyncExitStack() as stack:
            load = (_load_at_exec if reads_at_exec(saved.codec, saved.manifest.x_ignore_shared)
                    else _load_deferred)
            mon = await load(ctx, stack, vm, op, saved)
            faults.point("restore.loaded")
            if vm.agent is not None:
                vm.agent.send_sync()  # waiting for the guest, not for `cont`'s reply
            with op.phase("resume"):
                await _consume_and_resume(ctx, mon, vm)
    except BaseException as exc:
        if vm.agent is not None:
            await vm.agent.close()
        if vm.process is not None and not vm.resumed:  # a guest that runs is left running
            await lifecycle.terminate(ctx, vm.process)
        await op.persist(ctx.paths, exc)
        raise
    return vm


async def _failed_running(ctx: InstanceContext, reaper: Reaper, vm: _Incoming,
                          op: PhaseRecorder, helper: asyncio.Future[Applied] | None,
                          exc: BaseException) -> OperationFailed:
    """A failure once the guest runs: the VM is left running (never killed: its state is
    consumed), the helper's request and the agent let go, the failure recorded."""
    await cancel_helper(helper)
    if vm.agent is not None:
        await vm.agent.close()
    why = str(exc) if isinstance(exc, Exception) else "it was interrupted"
    failure = OperationFailed(f"restore of {ctx.name}: the VM runs again but "
                              f"{why or type(exc).__name__}")
    await op.persist(ctx.paths, failure)
    # (a removal cancelled with the block may not have begun)
    await reaper.remove(ctx.paths.standby_consumed_dir)
    return failure


def _read_back(path: Path, pid: int, stop: threading.Event) -> None:
    """The RAM file's data read into the page cache (queued at once: the disk's pace),
    then mapped into QEMU's page tables as it arrives (hypervisor/guestram.py), so that
    the guest's first pass over its memory neither waits for the disk nor faults per
    64 KiB."""
    prefetch(path, stop)
    guestram.map_in(pid, path, stop)


def waitable_state(paths: InstancePaths) -> Manifest | None:
    """The standby state's manifest if a QEMU can wait for its restore (memory-file, the
    RAM file raw: a compressed one is decompressed into a new file first), else None."""
    try:
        manifest = Manifest.load(paths.standby_dir)
    except TorporError:
        return None
    memory = manifest.memory_file
    return manifest if memory is not None and memory.codec is Codec.NONE else None


async def prepare(ctx: InstanceContext) -> bool:
    """For the daemon's restore pool, under the instance's lock (standby): start the
    QEMU its restore will claim (operations/warm.py), waiting with `-incoming defer` and
    the RAM file mapped. False if it has one already or its state cannot have one."""
    manifest = None if warm.load(ctx.paths) is not None else waitable_state(ctx.paths)
    if manifest is None:
        return False
    config = check_compatible(ctx, manifest)
    check_memory_file(ctx, config, manifest)
    memory = config.memory_file
    assert memory is not None
    owner = ProcessIdentity.of(os.getpid())
    assert owner is not None

    def record(identity: ProcessIdentity, launched: VMConfig) -> None:
        warm.save(ctx.paths, warm.WarmRecord(
            identity=identity, owner=owner, requested=config, launched=launched,
            memory=FileIdentity.of(memory.path), launched_at=utc_now()))

    def start(_stop: object) -> TrackedProcess:
        return lifecycle.launch_for(ctx, config, incoming=DEFERRED, on_started=record)[0]

    def undo(_: TrackedProcess) -> None:  # cancelled meanwhile: nothing stays behind
        warm.discard(ctx.paths)

    await in_thread(start, undo=undo)
    return True


def consume_state(ctx: InstanceContext) -> None:
    """Set the loaded state aside, durably, before the guest runs: from here on no command
    loads it again (see the module's docstring)."""
    remove_tree(ctx.paths.standby_consumed_dir)
    os.rename(ctx.paths.standby_dir, ctx.paths.standby_consumed_dir)
    fsync_dir(ctx.paths.snapshots_dir)


def _give_back_state(ctx: InstanceContext) -> None:
    os.rename(ctx.paths.standby_consumed_dir, ctx.paths.standby_dir)
    fsync_dir(ctx.paths.snapshots_dir)


async def _consume_and_resume(ctx: InstanceContext, mon: Monitor, vm: _Incoming) -> None:
    """The loaded state set aside, then `cont`. If either fails or is cancelled (a Ctrl-C
    between the two used to leave a paused QEMU, killed next, and its state consumed:
    the guest's RAM was lost): a guest that runs stays running (`vm.resumed`); one that
    has certainly not run (QEMU answers, still paused) gets its state back, restorable
    again; else (QEMU silent: it may have run) the state stays consumed."""
    try:
        await to_thread(consume_state, ctx)
        faults.point("restore.consumed")
        await mon.resume()
    except BaseException:
        with contextlib.suppress(Exception):
            vm.resumed = await mon.status() == "running"
            consumed, latest = ctx.paths.standby_consumed_dir, ctx.paths.standby_dir
            if vm.resumed:  # it has moved on from the state: garbage
                await to_thread(remove_tree, consumed)
            elif consumed.exists() and not latest.exists():
                await to_thread(_give_back_state, ctx)
        raise


async def _load_at_exec(ctx: InstanceContext, stack: contextlib.AsyncExitStack,
                        vm: _Incoming, op: PhaseRecorder, saved: _Saved) -> Monitor:
    """QEMU started with the state file on its command line: it loads as soon as it has
    initialised. `spawn` ends when it begins to read, `load` when the state is in and its
    checksum verified. Returns the monitor of the paused, loaded QEMU."""
    config, manifest = saved.config, saved.manifest
    feed = await stack.enter_async_context(exec_feed(saved.path, manifest.state))
    progress = observe.counter("load", manifest.state.stored_bytes)
    # The launch's outcome, not its task: a task failing in the group would cancel us
    # before `feed` has said what the failure means (a state failing its checksum).
    launching: asyncio.Future[TrackedProcess] = asyncio.get_running_loop().create_future()

    async def launch() -> None:
        try:  # started, then we fail: the caller kills vm.process
            vm.process = await lifecycle.spawn(ctx, config, incoming=feed.uri,
                                               pass_fds=(feed.fd,),
                                               ready_timeout=feed.ready_timeout)
            launching.set_result(vm.process)
        except Exception as exc:
            launching.set_exception(exc)
            launching.exception()  # marked as seen: `feed` reads it if it still waits

    async with task_group() as group:  # we fail meanwhile: spawn kills what it started
        group.create_task(launch())
        with op.phase("spawn"):
            await feed.until_read_from(launching)
        faults.point("restore.spawned")
        # Attached while QEMU loads, before the guest runs (see _load_deferred).
        vm.agent = await GuestAgent.attach_early(ctx.paths.agent_pipe)
        with op.phase("load"):
            await feed.followed(launching, progress)
            try:
                mon = await stack.enter_async_context(Monitor.connect(ctx.paths.qmp_socket))
                await _check_version(ctx, mon, manifest)
                await feed.completed(mon, progress)
            except QmpError as exc:  # QEMU exited on a state it could not load
                raise await feed.lost(exc, _last_line(ctx.paths.qemu_log)) from exc
    return mon


async def _load_deferred(ctx: InstanceContext, stack: contextlib.AsyncExitStack,
                         vm: _Incoming, op: PhaseRecorder, saved: _Saved) -> Monitor:
    """QEMU started with `-incoming defer`; the state (through a decompressor, or after
    setting x-ignore-shared) is handed to it through the monitor. A state fed by a thread
    of ours starts feeding first: its first frames are decoded while QEMU starts."""
    config, manifest, path, codec = saved.config, saved.manifest, saved.path, saved.codec
    stream = (await stack.enter_async_context(feeding(path, codec))
              if is_fed(codec, manifest.state) else None)
    with op.phase("spawn"):
        # Memory-file mode: a QEMU the daemon started ahead (its restore pool) is claimed.
        # (Only such states get one; they always load here, never at exec.)
        waiting = (await to_thread(warm.claim, ctx.paths, config)
                   if config.memory_file is not None else None)
        vm.process = waiting or await lifecycle.spawn(ctx, config, incoming=DEFERRED)
    faults.point("restore.spawned")
    # Attached before the state is loaded, the guest-sync goes out before `cont`, and
    # (on a socket port) the port stays "host connected": no 100 ms retry sleep.
    vm.agent = await GuestAgent.attach_early(ctx.paths.agent_pipe)
    mon = await stack.enter_async_context(Monitor.connect(ctx.paths.qmp_socket))
    await _check_version(ctx, mon, manifest)  # asked of the QEMU that loads: exact
    with op.phase("load"):
        progress = observe.counter("load", manifest.state.stored_bytes)
        await load_state(mon, path, codec, manifest.state, progress,
                         ignore_shared=manifest.x_ignore_shared, stream=stream)
    return mon


def _last_line(log_file: Path) -> str:
    with contextlib.suppress(OSError):
        lines = log_file.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""
    return ""


async def _check_version(ctx: InstanceContext, mon: Monitor, manifest: Manifest) -> None:
    version = await mon.version()
    if version != manifest.qemu_version:
        raise IntegrityError(f"saved state of {ctx.name} was written by QEMU "
                             f"{manifest.qemu_version}; this host has {version}")
