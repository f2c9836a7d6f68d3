"""Stored snapshots: a copy of an instance directory (disk, metadata, machine state) made
with the copy engine, plus a record.

From a running VM the snapshot pauses it and runs the save leg (machine state into the
snapshot's staging directory) and the copy leg (instance directory → payload, skipping
snapshots/ and run/) at the same time: the paused window is max(save, copy) instead of
their sum. Neither leg fsyncs inside the pause (the source keeps running, so durability
is only needed before the snapshot is published); after resuming, the state is moved
(renamed, not copied again) into the payload and everything is flushed. The source is
resumed on every path; a failure leaves no payload and no orphaned state directory, and
names the leg that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Literal

from torpor import faults
from torpor.codec import Codec
from torpor.copy import CopyReport, copy_file, copy_tree
from torpor.errors import (
    AlreadyExists,
    InvalidArgument,
    TorporError,
    Unsupported,
    WrongState,
)
from torpor.fsutil import (
    allocated_bytes,
    fsync_dir,
    fsync_tree,
    owned_name,
    owner_tag,
    remove_tree,
)
from torpor.hypervisor.blockfreeze import DiskFreeze, thaw, thaw_offline
from torpor.hypervisor.qmp import Monitor, QmpError
from torpor.hypervisor.vmconfig import drive_id
from torpor.instances import observe
from torpor.instances.context import InstanceContext, Settings
from torpor.instances.locking import file_lock
from torpor.instances.metadata import (
    CompressionPlan,
    CompressionPolicy,
    InstanceMetadata,
    InstanceState,
    resolve_policy,
    utc_now,
)
from torpor.instances.record import PhaseRecorder
from torpor.instances.runtime import RuntimeRecord, derive_state
from torpor.instances.snapshotrecord import (
    SnapshotKind,
    SnapshotRecord,
    all_records,
    save_record,
    validate_snapshot_name,
    validate_tags,
)
from torpor.instances.states import is_live
from torpor.jobs import compression as compression_jobs
from torpor.machinestate.manifest import Manifest, rebind_memory_file
from torpor.machinestate.stream import (
    FRAME_THREADS,
    finalize_checksum,
    prepare_outgoing,
    save_state,
)
from torpor.operations.legs import run_legs
from torpor.operations.paused import paused_window
from torpor.operations.standby import build_manifest
from torpor.paths import DataRoot, InstancePaths, SnapshotPaths
from torpor.tasks import Reaper, in_thread, to_the_end, to_thread

log = logging.getLogger(__name__)

AUTO_TAG = "torpor.auto"  # a snapshot torpor made for forks, removed with the last of them
AUTO_BASE = "fork"  # memory-file mode: the forks map its RAM file; kept while they exist
AUTO_TEMPORARY = "fork-temporary"  # a running source's state for the forks' copies
OWNER_TAG = "torpor.owner"  # the process that made an automatic snapshot (fsutil.owner_tag)
# A standby source's fork base: what it was taken of (fork.standby_key), so the next fork
# of the unchanged source reuses it while it is kept.
SOURCE_STATE_TAG = "torpor.source-state"


def auto_tags(purpose: str) -> dict[str, str]:
    """A snapshot torpor makes for a fork says so, and which process made it: if that
    process dies before the snapshot has dependents, `torpor check` removes it."""
    return {AUTO_TAG: purpose, OWNER_TAG: owner_tag()}


def dependents(data_root: DataRoot, snapshot_id: str,
               instances: list[InstanceMetadata]) -> list[str]:
    """Those of `instances` forked from the snapshot, or mapping its memory file."""
    snapshot_dir = data_root.snapshot(snapshot_id).root
    return [m.name for m in instances
            if m.origin_snapshot == snapshot_id
            or (m.memory_origin is not None and m.memory_origin.is_relative_to(snapshot_dir))]


# --- create ---------------------------------------------------------------------------------

def _skip(paths: InstancePaths, *more: str) -> tuple[str, ...]:
    """What a copy of an instance never takes: its runtime (sockets, process record) and a
    disk overlay (the guest's writes during a snapshot, folded back into the disk)."""
    return (paths.run_dir.name, paths.disk_overlay.name, paths.publish_dir.name,
            paths.hold_file.name, *more)


def _running_skip(paths: InstancePaths) -> tuple[str, ...]:
    return _skip(paths, paths.snapshots_dir.name)


async def copy_leg(ctx: InstanceContext, payload: Path) -> CopyReport:
    """Instance directory → payload whole, the VM paused (serial mode). No fsync: the
    snapshot is flushed after the source resumes, before it is published."""
    return await _copy_instance(ctx, payload, _running_skip(ctx.paths), fsync=False)


async def _copy_instance(ctx: InstanceContext, payload: Path, skip: tuple[str, ...], *,
                         fsync: bool, link: tuple[str, ...] = ()) -> CopyReport:
    progress = observe.counter("copy", allocated_bytes(ctx.paths.root, skip))
    report = await in_thread(lambda stop: copy_tree(ctx.paths.root, payload, skip=skip,
                                                    fsync=fsync, cancel=stop,
                                                    progress=progress, link=link))
    return observe.copied(report)


async def frozen_copy_leg(ctx: InstanceContext, payload: Path, freeze: DiskFreeze,
                          release_pause: asyncio.Event) -> CopyReport:
    """The overlapped copy leg. Inside the pause: freeze the disk (the guest's writes go
    to an overlay from here on) and copy what the guest would change once resumed
    (metadata; the RAM file in memory-file mode). Then release the pause and copy the
    frozen disk while the guest runs. No fsync (see copy_leg)."""
    skip = _running_skip(ctx.paths)
    disk = ctx.paths.disk
    try:
        await freeze.freeze()  # first: every moment before it is paused time
        faults.point("snapshot.frozen")
        progress = observe.counter("copy", allocated_bytes(ctx.paths.root, skip))
        rest = await in_thread(lambda stop: copy_tree(
            ctx.paths.root, payload, skip=(*skip, disk.name), cancel=stop, progress=progress))
    finally:
        release_pause.set()  # frozen, or failed: either way the pause is not needed
    disk_copy = await in_thread(lambda stop: copy_file(
        disk, InstancePaths(payload).disk, cancel=stop, progress=progress))
    return observe.copied(rest.merged(disk_copy))


async def save_leg(mon: Monitor, record: RuntimeRecord, directory: Path,
                   policy: CompressionPolicy) -> Manifest:
    """The paused VM's machine state into `directory` (created here), not yet flushed."""
    directory.mkdir(parents=True)
    progress = observe.counter("save", record.vm_config.memory_mib << 20)
    # QEMU writes the file itself: the zero-page filter (standby's) would lengthen the
    # source's pause by ~0.3 s per GiB of guest data, and here the pause is what counts.
    state = await save_state(mon, directory, policy.codec, policy.effective_level(),
                             progress, fsync=False)
    return build_manifest(record.vm_config, state, await mon.version())


async def _overlapped_pause(ctx: InstanceContext, record: RuntimeRecord, staging: SnapshotPaths,
                            serial: bool, policy: CompressionPolicy, op: PhaseRecorder
                            ) -> tuple[Manifest, CopyReport]:
    """A running source's snapshot: pause, both legs, resume. Overlapped, the pause ends
    when the state is saved and the disk is frozen; the disk copy goes on meanwhile, and
    the overlay is folded back once both legs have ended (on every path)."""
    state_dir = _state_staging(staging)
    async with Monitor.connect(ctx.paths.qmp_socket) as mon:
        # Memory-file mode: the save leg is device state only; RAM goes with the copy leg.
        await prepare_outgoing(mon, record.vm_config)
        freeze = DiskFreeze(mon, drive_id(0), ctx.paths.disk_overlay)
        try:
            async with paused_window(ctx, mon, record.process(), op,
                                     f"snapshot of {ctx.name}") as window:
                faults.point("snapshot.paused")
                if serial:
                    with op.phase("save+copy"):
                        manifest = await save_leg(mon, record, state_dir, policy)
                        report = await copy_leg(ctx, staging.payload)
                else:
                    released = asyncio.Event()

                    async def save_then_resume() -> Manifest:
                        saved = await save_leg(mon, record, state_dir, policy)
                        faults.point("snapshot.saved")
                        await released.wait()  # the disk is frozen (or its leg failed)
                        await window.release()
                        faults.point("snapshot.resumed")
                        return saved

                    with op.phase("legs"):
                        manifest, report = await run_legs(
                            save_then_resume(),
                            frozen_copy_leg(ctx, staging.payload, freeze, released))
            faults.point("snapshot.copied")
        except BaseException as exc:
            await _thaw_after_failure(freeze, exc)  # after the resume: the guest runs again
            raise
        with op.phase("thaw"):
            await to_the_end(freeze.thaw())  # a fold-back cut short leaves the overlay
        faults.point("snapshot.thawed")
    return manifest, report


async def _thaw_after_failure(freeze: DiskFreeze, error: BaseException) -> None:
    try:
        await freeze.thaw()
    except QmpError as exc:  # the leg's error stays the one raised; this one must be seen
        log.error("after %s: %s (torpor folds it back at the next operation)", error, exc)


async def fold_back_frozen_disk(ctx: InstanceContext) -> bool:
    """A snapshot interrupted between freeze and thaw (torpor killed) leaves the guest's
    recent writes in the disk overlay: fold them back before anything else touches the
    instance (online if QEMU still runs, with qemu-img if it does not). False if it has
    to wait: a hung QEMU still holds the overlay (once it is killed, the next operation
    folds it back offline)."""
    overlay = ctx.paths.disk_overlay
    if not overlay.exists():
        return False
    state, _ = await derive_state(ctx.paths)  # recovery runs before the guard: derived here
    if state is InstanceState.UNRESPONSIVE:
        return False
    log.warning("instance %s: folding back the disk overlay of an interrupted snapshot",
                ctx.name)
    if is_live(state):
        async with Monitor.connect(ctx.paths.qmp_socket) as mon:
            await thaw(mon, drive_id(0), overlay)
    else:
        await to_thread(thaw_offline, overlay)
    return True


def _state_staging(staging: SnapshotPaths) -> Path:
    """Where the save leg writes: beside the payload, so the copy leg (which builds the
    payload and renames it into place) never sees it; moved into the payload afterwards."""
    return staging.root / "state"


def _finish_running_snapshot(staging: SnapshotPaths, manifest: Manifest,
                             compress_level: int | None, stop: threading.Event) -> None:
    """After the source resumed: move the state into the payload (a rename, not a second
    pass), compress it (`auto`: compress_level), flush everything, and checksum the
    state."""
    state_dir = staging.payload_instance().standby_dir
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    _state_staging(staging).rename(state_dir)
    if compress_level is not None:
        manifest = compression_jobs.compress_saved_state(
            state_dir, manifest, compress_level, threads=FRAME_THREADS, stop=stop)
    fsync_tree(staging.root)
    manifest.state = finalize_checksum(state_dir, manifest.state)
    manifest.save(state_dir)
    rebind_memory_file(state_dir, staging.payload_instance().memory_file)


async def create(ctx: InstanceContext, name: str, tags: dict[str, str], *,
                 serial: bool = False, compression: CompressionPolicy | None = None,
                 link: bool = False) -> SnapshotRecord:
    """Snapshot the instance (running, paused, standby or stopped); caller holds its lock.
    Compression follows standby's rules (`snapshot_compression`): a running source's
    state is compressed as it is saved (`sync`), or saved raw and compressed by a
    background job on the stored payload (`background`). `link` (a standby source): its
    disk and RAM file are hard-linked into the payload, not copied; the instance guard
    gives the source copies of its own before anything may write them (unshare.py)."""
    validate_snapshot_name(name)
    validate_tags(tags)
    save_policy, plan = snapshot_compression(ctx, compression)
    data_root = ctx.data_root
    if any(r.name == name and r.source_id == ctx.meta.id for r in all_records(data_root)):
        raise AlreadyExists(f"instance {ctx.name} already has a snapshot named {name!r}")
    state, record = ctx.state, ctx.record
    snapshot_id = secrets.token_hex(6)
    staging = data_root.snapshot_staging(owned_name(snapshot_id))
    op = PhaseRecorder("snapshot", ctx.name)
    try:
        staging.root.mkdir(parents=True)
        if is_live(state):
            assert record is not None
            kind: SnapshotKind = "running"
            mode: Literal["overlapped", "serial", "copy"] = "serial" if serial else "overlapped"
            # `auto` saves raw in the pause and compresses once the source runs again.
            compress_level = (save_policy.effective_level() if
                              compression_jobs.compressed_after_window(save_policy) else None)
            manifest, report = await _overlapped_pause(
                ctx, record, staging, serial,
                save_policy if compress_level is None else CompressionPolicy(), op)
            with op.phase("flush"):  # outside the pause: durability before publishing
                await in_thread(lambda stop: _finish_running_snapshot(
                    staging, manifest, compress_level, stop))
        else:
            kind = "standby" if state is InstanceState.STANDBY else "stopped"
            mode = "copy"
            report = await _copy_at_rest(ctx, staging, kind, op, link=link)
        snap = _record(ctx, snapshot_id, name, kind, mode, tags, report, staging, op)
        if plan is not None and _raw_state(staging.payload_instance()):
            # In the record before it is published: a restart then re-queues it.
            snap.compression_plan = plan
        await to_thread(save_record, staging, snap)
        faults.point("snapshot.flushed")
        await to_thread(publish, staging, data_root.snapshot(snapshot_id).root)
        faults.point("snapshot.published")
    except BaseException as exc:
        await to_thread(discard, staging, data_root.snapshot(snapshot_id).root)
        await op.persist(ctx.paths, exc)
        raise
    if snap.compression_plan is not None:
        await to_thread(
            compression_jobs.launch_worker, data_root,
            compression_jobs.Subject.snapshot(snapshot_id),
            slots=ctx.settings.compression_jobs, rate_limit=ctx.settings.compression_rate_limit)
    await op.persist(ctx.paths)
    return snap


def snapshot_compression(ctx: InstanceContext, request: CompressionPolicy | None
                         ) -> tuple[CompressionPolicy, CompressionPlan | None]:
    """What a snapshot of this instance does with its machine state, by standby's rules:
    the request, then the instance's policy, then the configured default; `sync`
    compresses as the state is saved, `background` saves it raw for a job on the stored
    payload (memory-file mode: always a job, on the RAM file, after the idle delay).
    Returns (the policy the save uses, the job's plan or None). What cannot be honoured
    is refused before anything happens, never ignored."""
    if request is not None:
        request.effective_level()
    asked = request is not None and request.codec is not Codec.NONE
    if ctx.state is InstanceState.STOPPED and asked:
        raise InvalidArgument(f"instance {ctx.name} is stopped: it has no machine state to"
                              " compress (snapshot it without --compress)")
    policy = resolve_policy(request, ctx.meta.snapshot_policy, ctx.settings.default_compression)
    if policy.codec is Codec.NONE or ctx.state is InstanceState.STOPPED:
        return CompressionPolicy(), None
    if ctx.state is InstanceState.STANDBY and policy.mode == "sync":
        if asked:
            raise Unsupported(f"instance {ctx.name} is in standby: its saved state is copied"
                              " as it is; compress the snapshot's copy with --background")
        return CompressionPolicy(), None  # the standby's own policy already applied
    if ctx.meta.memory_backing == "file":
        policy = compression_jobs.for_memory_file(policy, ctx.settings.memory_compression_delay)
    if policy.mode == "sync":
        return policy, None
    return CompressionPolicy(), compression_jobs.make_plan(policy, time.time())


def _raw_state(payload: InstancePaths) -> bool:
    """Whether the payload holds machine state its job can compress (not already so)."""
    try:
        target = compression_jobs.compression_target(payload)
    except TorporError:
        return False
    return target.exists()


def publish(staging: SnapshotPaths, final: Path) -> None:
    staging.root.rename(final)  # the snapshot appears whole or not at all
    fsync_dir(final.parent)


def discard(staging: SnapshotPaths, final: Path) -> None:
    shutil.rmtree(staging.root, ignore_errors=True)
    remove_tree(final)  # all or nothing, even once published


async def _copy_at_rest(ctx: InstanceContext, staging: SnapshotPaths, kind: SnapshotKind,
                        op: PhaseRecorder, *, link: bool = False) -> CopyReport:
    """A standby or stopped source: a plain copy (its disk and RAM file linked, with
    `link`). A standby source's state is read, so its background job stops first, and is
    queued again afterwards (the state stays; a job replaces the RAM file, never writes
    it in place, so a linked one is safe)."""
    plan = None
    if kind == "standby":
        plan = await to_thread(compression_jobs.prepare_for_read, ctx)
    try:
        skip = _skip(ctx.paths) if kind == "standby" else _running_skip(ctx.paths)
        with op.phase("copy"):
            linked = ((ctx.paths.disk.name, ctx.paths.memory_file.name)
                      if link and kind == "standby" else ())
            report = await _copy_instance(ctx, staging.payload, skip, fsync=True, link=linked)
        payload = staging.payload_instance()
        if kind == "standby":
            await to_thread(rebind_memory_file, payload.standby_dir, payload.memory_file)
    finally:
        await to_thread(
            compression_jobs.resume_plan, ctx, plan, slots=ctx.settings.compression_jobs,
            rate_limit=ctx.settings.compression_rate_limit)
    return report


def _record(ctx: InstanceContext, snapshot_id: str, name: str, kind: SnapshotKind,
            mode: Literal["overlapped", "serial", "copy"], tags: dict[str, str],
            report: CopyReport, paths: SnapshotPaths, op: PhaseRecorder) -> SnapshotRecord:
    codec = state_bytes = None
    if kind != "stopped":
        manifest = Manifest.load(paths.payload_instance().standby_dir)
        codec, state_bytes = manifest.state.codec, manifest.state.stored_bytes
    return SnapshotRecord(
        id=snapshot_id, name=name, source_id=ctx.meta.id, source_name=ctx.meta.name,
        kind=kind, mode=mode, created_at=utc_now(), tags=tags,
        logical_bytes=report.logical_bytes + (state_bytes or 0),
        bytes_written=report.bytes_written, copy_method=report.method,
        state_codec=codec, state_bytes=state_bytes, phases=dict(op.phases))


async def remove(data_root: DataRoot, snap: SnapshotRecord, dependents: list[str],
                 reaper: Reaper) -> None:
    """The snapshot gone at once (its tree set aside; the bytes go through `reaper`)."""
    if dependents:
        raise WrongState(f"snapshot {snap.name} cannot be deleted: forks depend on it "
                         f"({', '.join(sorted(dependents))})")
    key = compression_jobs.Subject.snapshot(snap.id).key
    # its job reads the payload
    await to_thread(compression_jobs.cancel_and_wait, data_root, key)
    await reaper.remove(data_root.snapshot(snap.id).root)
    compression_jobs.remove_job_files(data_root, key)
    data_root.snapshot_lock(snap.id).unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def reading(settings: Settings, data_root: DataRoot, snapshot_id: str,
                  mapped: Callable[[], bool]) -> AsyncIterator[None]:
    """Hold a stored snapshot to read its payload: its lock, its job stopped (and the
    plan handed back afterwards, unless `mapped()` says forks now map its RAM file)."""
    async with file_lock(data_root.snapshot_lock(snapshot_id),
                         what=f"snapshot {snapshot_id}"):
        plan = await to_thread(compression_jobs.prepare_snapshot_for_read, data_root,
                                       snapshot_id)
        try:
            yield
        finally:
            await to_thread(
                compression_jobs.resume_snapshot_plan, data_root, snapshot_id, plan,
                mapped=await to_thread(mapped), slots=settings.compression_jobs,
                rate_limit=settings.compression_rate_limit)


async def restore_into(ctx: InstanceContext, snap: SnapshotRecord) -> None:
    """Replace the instance's disk and standby state with the snapshot's (not running:
    the state guard saw to that)."""
    payload = ctx.data_root.snapshot(snap.id).payload_instance()
    await to_thread(compression_jobs.prepare_for_read, ctx)
    async with reading(ctx.settings, ctx.data_root, snap.id, mapped=lambda: False):
        await to_thread(_replace_from_payload, ctx, payload)


def _replace_from_payload(ctx: InstanceContext, payload: InstancePaths) -> None:
    copy_file(payload.disk, ctx.paths.disk, replace=True, fsync=True)
    if payload.memory_file.exists():  # memory-file mode: the instance's own copy of the RAM
        copy_file(payload.memory_file, ctx.paths.memory_file, replace=True, fsync=True)
    else:
        ctx.paths.memory_file.unlink(missing_ok=True)
    if ctx.paths.standby_dir.exists():
        remove_tree(ctx.paths.standby_dir)
    if payload.standby_dir.exists():
        ctx.paths.snapshots_dir.mkdir(exist_ok=True)
        copy_tree(payload.standby_dir, ctx.paths.standby_dir, fsync=True)
        rebind_memory_file(ctx.paths.standby_dir, ctx.paths.memory_file)
    ctx.paths.run_dir.mkdir(exist_ok=True)
