"""Standby: pause, save the machine state, stop QEMU, give the host its memory back.

The paused window (operations/paused.py) is pause → the state published and QEMU sent
SIGKILL: from then on the VM can no longer run. Failure rules: anything failing before that
removes what was saved and resumes the VM; QEMU dying mid-save leaves the instance
`crashed` with its disk intact and no saved state. Once the state is published QEMU is
killed, not asked to quit (see _save_and_stop).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from torpor import faults
from torpor.codec import Codec
from torpor.errors import WrongState
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
from torpor.machinestate.stream import (
    FRAME_THREADS,
    finalize_checksum,
    hand_state_file,
    prepare_outgoing,
    save_state,
    writes_directly,
)
from torpor.operations.paused import paused_window
from torpor.tasks import in_thread, to_thread

log = logging.getLogger(__name__)
EXIT_TIMEOUT = 10.0


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
    async with Monitor.connect(ctx.paths.qmp_socket) as mon, contextlib.AsyncExitStack() as stack:
        qemu_version = await mon.version()
        await prepare_outgoing(mon, record.vm_config)
        # The zero-page filter only where its tests prove it (QEMU 7.2).
        fresh = zeroed_ram_block(record.vm_config) if zeropages.proven_on(qemu_version) else None
        handed = None
        pidfd = stack.enter_context(process.held_pidfd())  # for the kill, checked now
        try:
            partial.mkdir(parents=True)
            if writes_directly(policy.codec, fresh):  # memory-file mode's device state
                handed = stack.enter_context(await hand_state_file(mon, partial))
        except BaseException:
            _discard_saved(ctx)
            raise
        # Memory-file mode: the migration has no RAM to copy while the VM runs, so it
        # stops the VM itself, and the window loses the `stop` round trip.
        async with paused_window(ctx, mon, process, op, f"standby of {ctx.name}",
                                 stopped_by_migration=handed is not None) as window:
            try:
                faults.point("standby.paused")
                with op.phase("save"):
                    progress = observe.counter("save", ctx.meta.memory_mib << 20)
                    state = await save_state(mon, partial, policy.codec,
                                             policy.effective_level(), progress,
                                             fresh_block=fresh, handed=handed, fsync=False)
                    manifest = build_manifest(record.vm_config, state, qemu_version)
                    manifest.guest_clock_source = ctx.meta.guest_clock_source
                    await to_thread(_make_durable, partial, latest, manifest)
                faults.point("standby.published")
                # A completed migration has flushed and released the disks (QEMU's
                # bdrv_inactivate_all) and the state is durable: QEMU has nothing left
                # to do but free its memory. SIGKILL ends it without the `quit` round
                # trip, and from the signal on the VM can no longer run: the window ends.
                with op.phase("kill"), contextlib.suppress(ProcessLookupError):
                    if pidfd is not None:  # else QEMU is gone already: nothing can run
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                await window.exited()
            except BaseException:
                _discard_saved(ctx)  # the VM is resumed next (or crashed): this is stale
                raise
    with op.phase("exit"):  # unmapping its RAM: ~5 ms more, outside the window
        await to_thread(process.kill, EXIT_TIMEOUT)
    return manifest


def _queue_compression(ctx: InstanceContext, policy: CompressionPolicy) -> None:
    """The plan recorded, then its detached worker started (a fork and exec: a thread)."""
    ctx.meta.compression_plan = compression_jobs.make_plan(policy, time.time())
    ctx.meta.save(ctx.paths.metadata)
    compression_jobs.launch_worker(ctx.data_root, compression_jobs.Subject.instance(ctx.meta.id),
                                   slots=ctx.settings.compression_jobs,
                                   rate_limit=ctx.settings.compression_rate_limit)


async def _compress_after_window(ctx: InstanceContext, manifest: Manifest,
                                 policy: CompressionPolicy, op: PhaseRecorder) -> Manifest:
    """The published raw state compressed in place (`auto`). Failing here loses nothing:
    the raw state stays what a restore loads, and standby still succeeds."""
    level = policy.effective_level()
    try:
        with op.phase("compress"):
            return await in_thread(lambda stop: compression_jobs.compress_saved_state(
                ctx.paths.standby_dir, manifest, level, threads=FRAME_THREADS, stop=stop))
    except Exception as exc:  # (a cancelled task still raises: CancelledError)
        log.warning("standby of %s: the saved state stays uncompressed: %s", ctx.name, exc)
        return manifest


def _make_durable(partial: Path, latest: Path, manifest: Manifest) -> None:
    """The saved state flushed, its manifest written, the directory published: in one
    thread hop (each costs ~0.3 ms here, and this is inside the paused window)."""
    fd = os.open(partial / manifest.state.stored_name(), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    manifest.save(partial)
    faults.point("standby.saved")
    _publish(partial, latest)


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
    # `auto`: save raw inside the window; compressed after it, before standby returns.
    compress_after = compression_jobs.compressed_after_window(policy)
    save_policy = CompressionPolicy() if background or compress_after else policy
    op = PhaseRecorder("standby", ctx.name)
    try:
        manifest = await _save_and_stop(ctx, record, save_policy, op)
        clear_runtime(ctx.paths)
        faults.point("standby.stopped")
        if compress_after:
            manifest = await _compress_after_window(ctx, manifest, policy, op)
        if manifest.kind == "memory-file" and manifest.memory_file is not None:
            identity, samples = await to_thread(
                release_memory_file, ctx.paths.memory_file, op)
            manifest.memory_file = manifest.memory_file.model_copy(
                update={"identity": identity, "samples": samples})
        with op.phase("persist"):
            manifest.state = await to_thread(  # a no-op if hashed while written
                finalize_checksum, ctx.paths.standby_dir, manifest.state)
            manifest.phases = dict(op.phases)
            await to_thread(manifest.save, ctx.paths.standby_dir)
        if background:
            await to_thread(_queue_compression, ctx, policy)
    except BaseException as exc:
        await op.persist(ctx.paths, exc)
        raise
    await op.persist(ctx.paths)
    return op

