"""Standby: pause, save the machine state, stop QEMU, give the host its memory back.

The paused window (operations/paused.py) is pause → QEMU stopped. Failure rules:
anything failing before QEMU has stopped removes what was saved and resumes the VM; QEMU
refusing to stop is resumed and reported; QEMU dying mid-save leaves the instance
`crashed` with its disk intact and no saved state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from torpor import faults
from torpor.codec import Codec
from torpor.errors import OperationFailed, WrongState
from torpor.fsutil import fsync_dir, remove_tree
from torpor.hypervisor.qmp import Monitor
from torpor.hypervisor.vmconfig import VMConfig, zeroed_ram_block
from torpor.instances import observe
from torpor.instances.context import InstanceContext
from torpor.instances.metadata import CompressionPolicy, resolve_policy, utc_now
from torpor.instances.record import PhaseRecorder
from torpor.instances.runtime import RuntimeRecord, clear_runtime
from torpor.jobs import compression as compression_jobs
from torpor.machinestate import zeropages
from torpor.machinestate.manifest import (
    FileIdentity,
    Manifest,
    MemoryFileRecord,
    PageSample,
    StateFile,
    sample_pages,
)
from torpor.machinestate.stream import finalize_checksum, prepare_outgoing, save_state
from torpor.operations.paused import paused_window

log = logging.getLogger(__name__)
QUIT_TIMEOUT = 10.0


def build_manifest(vm_config: VMConfig, state: StateFile, qemu_version: str) -> Manifest:
    memory = vm_config.memory_file
    record = None
    if memory is not None and memory.shared:  # RAM stays in the file: device state only
        st = memory.path.stat()
        record = MemoryFileRecord(size_bytes=st.st_size, allocated_bytes=st.st_blocks * 512)
    return Manifest(created_at=utc_now(), qemu_version=qemu_version, vm_config=vm_config,
                    guest_visible=vm_config.guest_visible(), state=state,
                    kind="memory-file" if record else "stream", memory_file=record)


def release_memory_file(path: Path, op: PhaseRecorder) -> tuple[FileIdentity, list[PageSample]]:
    """After QEMU has quit: write the guest's RAM to disk and drop it from the page cache,
    so the host really gets the memory back (outside the paused window). Returns what
    restore checks the file against: its identity and sampled pages (read before the
    cache is dropped)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with op.phase("flush-memory"):
            os.fdatasync(fd)
            record = FileIdentity.of(path), sample_pages(path)
        with op.phase("drop-cache"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return record


async def _save_and_stop(ctx: InstanceContext, record: RuntimeRecord, policy: CompressionPolicy,
                         op: PhaseRecorder) -> Manifest:
    """The paused window: everything between `stop` and QEMU having exited. A failure
    before QEMU has stopped removes what was saved; then the window resumes the VM."""
    process = record.process()
    partial, latest = ctx.paths.standby_partial_dir, ctx.paths.standby_dir
    async with Monitor.connect(ctx.paths.qmp_socket) as mon:
        qemu_version = await mon.version()
        await prepare_outgoing(mon, record.vm_config)
        async with paused_window(ctx, mon, process, op, f"standby of {ctx.name}") as window:
            try:
                faults.point("standby.paused")
                with op.phase("save"):
                    partial.mkdir(parents=True)
                    progress = observe.counter("save", ctx.meta.memory_mib << 20)
                    # The zero-page filter only where its tests prove it (QEMU 7.2).
                    fresh = (zeroed_ram_block(record.vm_config)
                             if zeropages.proven_on(qemu_version) else None)
                    state = await save_state(mon, partial, policy.codec,
                                             policy.effective_level(), progress,
                                             fresh_block=fresh)
                    manifest = build_manifest(record.vm_config, state, qemu_version)
                    manifest.guest_clock_source = ctx.meta.guest_clock_source
                    await asyncio.to_thread(manifest.save, partial)
                    faults.point("standby.saved")
                    await asyncio.to_thread(_publish, partial, latest)
                faults.point("standby.published")
                with op.phase("stop"):
                    await mon.quit()
                    if not await asyncio.to_thread(process.wait_exit, QUIT_TIMEOUT):
                        raise OperationFailed("QEMU did not stop")
                await window.exited()
            except BaseException:
                _discard_saved(ctx)  # the VM is resumed next (or crashed): this is stale
                raise
    return manifest


def _queue_compression(ctx: InstanceContext, policy: CompressionPolicy) -> None:
    """The plan recorded, then its detached worker started (a fork and exec: a thread)."""
    ctx.meta.compression_plan = compression_jobs.make_plan(policy, time.time())
    ctx.meta.save(ctx.paths.metadata)
    compression_jobs.launch_worker(ctx.data_root, compression_jobs.Subject.instance(ctx.meta.id),
                                   slots=ctx.settings.compression_jobs,
                                   rate_limit=ctx.settings.compression_rate_limit)


def _publish(partial: Path, latest: Path) -> None:
    partial.rename(latest)
    fsync_dir(latest.parent)


def _discard_saved(ctx: InstanceContext) -> None:
    remove_tree(ctx.paths.standby_partial_dir)
    remove_tree(ctx.paths.standby_dir)


async def standby(ctx: InstanceContext, request: CompressionPolicy | None = None
                  ) -> PhaseRecorder:
    record = ctx.record
    if record is None:
        raise WrongState(f"instance {ctx.name} has no QEMU process record")
    policy = resolve_policy(request, ctx.meta.snapshot_policy, ctx.settings.default_compression)
    policy.effective_level()  # a bad level is an error before any side effect
    memory = record.vm_config.memory_file
    if memory is not None and memory.shared:
        policy = compression_jobs.for_memory_file(policy, ctx.settings.memory_compression_delay)
    background = policy.mode == "background" and policy.codec is not Codec.NONE
    # Background: save raw inside the paused window; a worker compresses after.
    save_policy = CompressionPolicy() if background else policy
    op = PhaseRecorder("standby", ctx.name)
    try:
        manifest = await _save_and_stop(ctx, record, save_policy, op)
        clear_runtime(ctx.paths)
        faults.point("standby.stopped")
        if manifest.kind == "memory-file" and manifest.memory_file is not None:
            identity, samples = await asyncio.to_thread(
                release_memory_file, ctx.paths.memory_file, op)
            manifest.memory_file = manifest.memory_file.model_copy(
                update={"identity": identity, "samples": samples})
        with op.phase("persist"):
            manifest.state = await asyncio.to_thread(  # a no-op if hashed while written
                finalize_checksum, ctx.paths.standby_dir, manifest.state)
            manifest.phases = dict(op.phases)
            await asyncio.to_thread(manifest.save, ctx.paths.standby_dir)
        if background:
            await asyncio.to_thread(_queue_compression, ctx, policy)
    except BaseException as exc:
        await op.persist(ctx.paths, exc)
        raise
    await op.persist(ctx.paths)
    return op

