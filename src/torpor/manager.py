"""The instance manager: a registry of instances on one data root, and the entry point
for every operation on them. Each mutating operation holds the instance's lock."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Literal

from torpor import faults
from torpor.copy import copy_file
from torpor.errors import AlreadyExists, InvalidArgument, NotFound, OperationFailed, WrongState
from torpor.fsutil import fsync_dir, owned_name, remove_tree
from torpor.guest.agent import AgentError, ExecResult, GuestAgent
from torpor.hypervisor.accel import AccelChoice
from torpor.hypervisor.vmconfig import PortForward
from torpor.images.builtin import GuestImage, ensure_builtin_image, recipe_hash
from torpor.instances.context import InstanceContext, Settings
from torpor.instances.info import CompressionState, InstanceInfo
from torpor.instances.locking import file_lock
from torpor.instances.metadata import (
    CompressionPolicy,
    ImageRef,
    InstanceMetadata,
    InstanceState,
    MemoryBacking,
    new_instance_id,
    new_mac,
    new_vmgenid,
    utc_now,
    validate_name,
)
from torpor.instances.runtime import derive_state
from torpor.jobs import compression as compression_jobs
from torpor.operations import fork as fork_op
from torpor.operations import health, lifecycle, snapshots
from torpor.operations import restore as restore_op
from torpor.operations import standby as standby_op
from torpor.operations.fork import TargetState
from torpor.operations.recover import recover
from torpor.operations.snapshots import SnapshotRecord
from torpor.paths import DataRoot, InstancePaths

StateCheck = Callable[[str, InstanceState], None]
DEFAULT_MEMORY = 512 << 20
DEFAULT_DISK = 2 << 30
MAX_CPUS = 64


class InstanceManager:
    def __init__(self, data_root: Path, settings: Settings | None = None,
                 lock_wait: float | None = None) -> None:
        self.data_root = DataRoot(data_root)
        self.settings = settings or Settings()
        self.lock_wait = lock_wait  # None: wait for a busy instance; 0: fail at once

    # --- lookup ---------------------------------------------------------------------

    def _all_metadata(self) -> list[InstanceMetadata]:
        found = []
        if not self.data_root.instances_dir.exists():
            return []
        for entry in sorted(self.data_root.instances_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError, ValueError):
                found.append(InstanceMetadata.load(self.data_root.instance(entry.name).metadata))
        return found

    def instance_names(self) -> set[str]:
        return {m.name for m in self._all_metadata()}

    def _find(self, name_or_id: str) -> InstanceMetadata:
        for meta in self._all_metadata():
            if name_or_id in (meta.name, meta.id):
                return meta
        raise NotFound(f"no instance named {name_or_id!r}")

    def _context(self, meta: InstanceMetadata) -> InstanceContext:
        return InstanceContext(self.data_root, self.settings, meta,
                               self.data_root.instance(meta.id))

    @contextlib.asynccontextmanager
    async def locked(self, name: str, precheck: StateCheck | None = None, *,
                     wait: float | Literal["default"] | None = "default"
                     ) -> AsyncIterator[InstanceContext]:
        """The instance's lock, with its metadata re-read once the lock is held.
        `precheck` refuses a wrong state before the lock is taken, so a request that is
        wrong anyway never holds the lock against one that is right (the operation checks
        again under the lock: that check is the one that counts)."""
        meta = self._find(name)
        if precheck is not None:
            state, _ = await derive_state(self.data_root.instance(meta.id))
            precheck(meta.name, state)
        async with file_lock(self.data_root.instance_lock(meta.id), what=f"instance {name}",
                             wait=self.lock_wait if wait == "default" else wait):
            paths = self.data_root.instance(meta.id)
            try:
                fresh = InstanceMetadata.load(paths.metadata)
            except FileNotFoundError:
                raise NotFound(f"no instance named {name!r}") from None
            ctx = self._context(fresh)
            await recover(ctx)  # whatever a killed operation left, put right first
            yield ctx

    async def info(self, meta: InstanceMetadata) -> InstanceInfo:
        paths = self.data_root.instance(meta.id)
        state, record = await derive_state(paths)
        return InstanceInfo(
            name=meta.name, id=meta.id, state=state, cpus=meta.cpus,
            memory_mib=meta.memory_mib, disk_bytes=meta.disk_bytes, mac=meta.mac,
            memory_backing=meta.memory_backing,
            created_at=meta.created_at, path=paths.root,
            pid=record.identity.pid if record and state is not InstanceState.CRASHED else None,
            accel=record.vm_config.accel if record else None,
            last_operation=meta.last_operation,
            compression=compression_jobs.status(self.data_root, paths, meta.compression_plan,
                                                meta.id),
        )

    async def get(self, name: str) -> InstanceInfo:
        return await self.info(self._find(name))

    async def list_all(self) -> list[InstanceInfo]:
        """Every instance; their QEMUs are asked for their state at the same time (one
        slow or hung monitor costs its own 2 s query timeout once, not once per VM)."""
        metas = await asyncio.to_thread(self._all_metadata)
        return list(await asyncio.gather(*(self.info(meta) for meta in metas)))

    def compression_states(self) -> list[CompressionState]:
        """Each instance's background compression state (for metrics)."""
        return [compression_jobs.status(self.data_root, self.data_root.instance(m.id),
                                        m.compression_plan, m.id).state
                for m in self._all_metadata()]

    def recover_jobs(self) -> list[str]:
        """Re-queue background compression plans whose worker is gone (a restart, a killed
        worker); clear plans whose instance left standby or whose raw file is gone.
        Returns what it did, one line per instance."""
        done = []
        for meta in self._all_metadata():
            line = self._requeue(meta)
            if line:
                done.append(f"{meta.name}: {line}")
        return done

    def _requeue(self, meta: InstanceMetadata) -> str | None:
        plan = meta.compression_plan
        key = compression_jobs.instance_job_key(meta.id)
        if plan is None or plan.error or compression_jobs.job_running(self.data_root, key):
            return None
        paths = self.data_root.instance(meta.id)
        if (paths.standby_dir / "manifest.json").exists():
            # The worker itself decides whether there is anything left to compress.
            compression_jobs.launch_worker(
                self.data_root, meta.id, slots=self.settings.compression_jobs,
                rate_limit=self.settings.compression_rate_limit)
            return "re-queued"
        compression_jobs.clear_stale_plan(self.data_root, meta.id)
        return "plan cleared"

    # --- health -------------------------------------------------------------------------

    async def check(self, *, repair: bool = False) -> list[health.Problem]:
        """Every inconsistency `torpor check` knows in this data root; with `repair`, fix
        what is safe to fix and say, per problem, whether it is gone."""
        if repair:
            return await health.repair(self, self.data_root)
        return await health.scan(self.data_root)

    async def repair_instance(self, instance_id: str, kind: health.Kind, path: Path) -> None:
        """One instance's problem, under its lock (never waited for: a busy instance is
        being put right by the operation that holds it). Recovery runs as the lock is
        taken; what it does not cover is done here."""
        async with self.locked(instance_id, wait=0) as ctx:
            state, record = await derive_state(ctx.paths)
            if kind is health.Kind.CRASHED and state is InstanceState.CRASHED and record:
                await lifecycle.terminate(ctx, record.process())
                lifecycle.discard_memory_file(ctx)
            elif kind is health.Kind.STALE_TEMP:
                path.unlink(missing_ok=True)
            elif kind is health.Kind.ORPHANED_PLAN:
                self._requeue(ctx.meta)

    # --- create / delete --------------------------------------------------------------

    def _import_image(self, image: GuestImage) -> ImageRef:
        """Copy the image's boot files into the data root once, so instances do not
        depend on a cache that a recipe change replaces."""
        target = self.data_root.image_dir(f"{image.name}-{recipe_hash()}")
        if not target.exists():
            staging = self.data_root.staging(owned_name(f"image-{target.name}"))
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for f in (image.kernel, image.initrd):
                if f is not None:
                    copy_file(f, staging / f.name, fsync=True)
            try:
                os.rename(staging, target)
            except OSError:
                if not target.exists():  # only losing a race to another creator is fine
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return ImageRef(name=image.name, kernel=target / image.kernel.name,
                        initrd=target / image.initrd.name if image.initrd else None,
                        cmdline=image.cmdline)

    @staticmethod
    def _publish(meta: InstanceMetadata, staging: Path, final: Path) -> None:
        """The metadata written (fsync), then the instance renamed into place: it appears
        whole or not at all."""
        meta.save(InstancePaths(staging).metadata)
        os.rename(staging, final)
        fsync_dir(final.parent)

    @staticmethod
    def _make_disk(rootfs: Path, disk: Path, size: int) -> None:
        copy_file(rootfs, disk)
        if size > disk.stat().st_size:
            try:
                os.truncate(disk, size)
            except OSError as exc:  # e.g. EFBIG: past the filesystem's largest file
                raise InvalidArgument(f"--disk-size {size} bytes: {exc.strerror}") from None
            result = subprocess.run(["resize2fs", "-f", str(disk)], capture_output=True,
                                    check=False)
            if result.returncode != 0:
                raise OperationFailed("resize2fs failed: " + result.stderr.decode()[-500:])
        with open(disk, "rb+") as f:
            os.fsync(f.fileno())

    async def create(self, name: str, *, memory_bytes: int = DEFAULT_MEMORY, cpus: int = 1,
                     disk_bytes: int = DEFAULT_DISK, image: GuestImage | None = None,
                     accel: AccelChoice = "auto",
                     port_forwards: list[PortForward] | None = None,
                     snapshot_policy: CompressionPolicy | None = None,
                     memory_backing: MemoryBacking = "anonymous") -> InstanceInfo:
        validate_name(name)
        if memory_backing not in ("anonymous", "file"):
            raise InvalidArgument("--memory-backing must be anonymous or file")
        if not 1 <= cpus <= MAX_CPUS:
            raise InvalidArgument(f"--cpus must be between 1 and {MAX_CPUS}")
        if memory_bytes < 64 << 20 or memory_bytes % (1 << 20):
            raise InvalidArgument("--memory must be a whole number of MiB, at least 64M")
        if snapshot_policy is not None:
            snapshot_policy.effective_level()
        # Blocking work goes to threads: in the daemon, other requests keep being served.
        if image is None:
            image = await asyncio.to_thread(lambda: ensure_builtin_image(quiet=True))
        base_size = image.rootfs.stat().st_size
        if disk_bytes < base_size:
            raise InvalidArgument(f"--disk-size must be at least the image's {base_size} bytes")
        self.data_root.ensure()
        async with file_lock(self.data_root.registry_lock, what="the instance registry"):
            if any(m.name == name for m in self._all_metadata()):
                raise AlreadyExists(f"an instance named {name!r} already exists")
            instance_id = new_instance_id()
            staging = self.data_root.staging(owned_name(f"create-{instance_id}"))
            try:
                staging.mkdir(parents=True)
                paths = InstancePaths(staging)
                for d in (paths.logs_dir, paths.run_dir, paths.snapshots_dir):
                    d.mkdir()
                await asyncio.to_thread(self._make_disk, image.rootfs, paths.disk, disk_bytes)
                image_ref = await asyncio.to_thread(self._import_image, image)
                meta = InstanceMetadata(
                    id=instance_id, name=name, created_at=utc_now(), cpus=cpus,
                    memory_mib=memory_bytes >> 20, disk_bytes=disk_bytes, mac=new_mac(),
                    image=image_ref, accel=accel,
                    port_forwards=port_forwards or [], snapshot_policy=snapshot_policy,
                    vmgenid=new_vmgenid(), memory_backing=memory_backing)
                final = self.data_root.instance(instance_id).root
                await asyncio.to_thread(self._publish, meta, staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return await self.info(meta)

    async def delete(self, name: str, *, force: bool = False) -> None:
        async with self.locked(name) as ctx:
            state, record = await derive_state(ctx.paths)
            if state in (InstanceState.RUNNING, InstanceState.PAUSED) and not force:
                raise WrongState(f"instance {name} is {state}: stop it first, or use --force")
            if record is not None:
                await lifecycle.terminate(ctx, record.process())
            faults.point("delete.killed")
            key = compression_jobs.instance_job_key(ctx.meta.id)
            await asyncio.to_thread(compression_jobs.cancel_and_wait, self.data_root, key)
            await asyncio.to_thread(remove_tree, ctx.paths.root)
            try:
                faults.point("delete.removed")
            finally:  # the instance is gone: what is left of it goes too
                compression_jobs.remove_job_files(self.data_root, key)
                with contextlib.suppress(FileNotFoundError):
                    self.data_root.instance_lock(ctx.meta.id).unlink()
            origin = ctx.meta.origin_snapshot
        await self.drop_auto_snapshot(origin)

    # --- lifecycle --------------------------------------------------------------------

    async def start(self, name: str, *, wait_agent: bool = True) -> InstanceInfo:
        async with self.locked(name, lifecycle.check_startable) as ctx:
            await lifecycle.start(ctx, wait_agent=wait_agent)
            return await self.info(InstanceMetadata.load(ctx.paths.metadata))

    async def stop(self, name: str, *, timeout: float | None = None,
                   force: bool = False) -> InstanceInfo:
        async with self.locked(name, lifecycle.check_stoppable) as ctx:
            await lifecycle.stop(ctx, timeout=timeout, force=force)
            return await self.info(InstanceMetadata.load(ctx.paths.metadata))

    async def standby(self, name: str, policy: CompressionPolicy | None = None
                      ) -> InstanceInfo:
        """Save the machine state and stop QEMU. `policy` overrides the instance's."""
        if policy is not None:
            policy.effective_level()
        async with self.locked(name, standby_op.check_state) as ctx:
            await standby_op.standby(ctx, policy)
            return await self.info(InstanceMetadata.load(ctx.paths.metadata))

    async def restore(self, name: str, *, then: restore_op.AgentStep | None = None
                      ) -> InstanceInfo:
        """`then`: a step on the guest agent, part of the restore (forks set their
        identity there, on the connection the restore already has)."""
        async with self.locked(name, restore_op.check_state) as ctx:
            await restore_op.restore(ctx, then)
            return await self.info(InstanceMetadata.load(ctx.paths.metadata))

    async def resume(self, name: str) -> InstanceInfo:
        """A VM left paused (by an operation that was killed, or by hand) runs again."""
        async with self.locked(name, lifecycle.check_resumable) as ctx:
            await lifecycle.resume(ctx)
            return await self.info(InstanceMetadata.load(ctx.paths.metadata))

    async def set_policy(self, name: str, policy: CompressionPolicy | None) -> None:
        if policy is not None:
            policy.effective_level()
        async with self.locked(name) as ctx:
            ctx.meta.snapshot_policy = policy
            ctx.meta.save(ctx.paths.metadata)

    # --- stored snapshots and forks -------------------------------------------------------

    async def snapshot_create(self, name: str, snapshot_name: str,
                              tags: dict[str, str] | None = None, *,
                              serial: bool = False,
                              compression: CompressionPolicy | None = None) -> SnapshotRecord:
        async with self.locked(name) as ctx:
            return await snapshots.create(ctx, snapshot_name, tags or {}, serial=serial,
                                          compression=compression)

    def snapshot_list(self, source: str | None = None) -> list[SnapshotRecord]:
        source_id = self._find(source).id if source else None
        return [r for r in snapshots.all_records(self.data_root)
                if source_id in (None, r.source_id)]

    def snapshot_get(self, snapshot: str, source: str | None = None) -> SnapshotRecord:
        source_id = self._find(source).id if source else None
        return snapshots.find_record(self.data_root, snapshot, source_id)

    def snapshot_dependents(self, snapshot_id: str) -> list[str]:
        """Instances forked from the snapshot, or mapping its memory file."""
        snapshot_dir = self.data_root.snapshot(snapshot_id).root
        return [m.name for m in self._all_metadata()
                if m.origin_snapshot == snapshot_id
                or (m.memory_origin is not None and m.memory_origin.is_relative_to(snapshot_dir))]

    async def drop_auto_snapshot(self, snapshot_id: str | None) -> None:
        """A snapshot torpor made for memory-file forks goes with the last of them."""
        if snapshot_id is None:
            return
        async with file_lock(self.data_root.registry_lock, what="the instance registry"):
            try:
                record = snapshots.find_record(self.data_root, snapshot_id)
            except NotFound:
                return
            if record.tags.get(fork_op.AUTO_TAG) and not self.snapshot_dependents(record.id):
                snapshots.remove(self.data_root, record, [])

    async def snapshot_delete(self, snapshot: str, source: str | None = None) -> None:
        async with file_lock(self.data_root.registry_lock, what="the instance registry"):
            record = self.snapshot_get(snapshot, source)
            await asyncio.to_thread(snapshots.remove, self.data_root, record,
                                    self.snapshot_dependents(record.id))

    async def snapshot_restore(self, name: str, snapshot: str) -> InstanceInfo:
        """Replace the instance's disk and machine state with a snapshot of it."""
        async with self.locked(name) as ctx:
            record = snapshots.find_record(self.data_root, snapshot, ctx.meta.id)
            await snapshots.restore_into(ctx, record)
            return await self.info(ctx.meta)

    async def snapshot_fork(self, snapshot: str, new_name: str, *, count: int = 1,
                            target_state: TargetState = "running",
                            source: str | None = None) -> list[InstanceInfo]:
        return await fork_op.from_snapshot(self, self.snapshot_get(snapshot, source), new_name,
                                           count=count, target_state=target_state)

    async def fork(self, source: str, new_name: str, *, count: int = 1,
                   target_state: TargetState = "running") -> list[InstanceInfo]:
        """Fork a running, standby or stopped instance into `count` copies. A running
        source is snapshotted (overlapped) and keeps running."""
        return await fork_op.from_instance(self, source, new_name, count=count,
                                           target_state=target_state)

    # --- guest access -----------------------------------------------------------------

    async def exec(self, name: str, argv: list[str], *, input: bytes | None = None,
                   timeout: float = 60.0) -> ExecResult:
        meta = self._find(name)
        paths = self.data_root.instance(meta.id)
        state, _ = await derive_state(paths)
        if state is not InstanceState.RUNNING:
            raise WrongState(f"instance {name} is {state}, not running")
        try:
            async with GuestAgent.connect(paths.agent_socket) as agent:
                return await agent.exec(argv, input=input, timeout=timeout)
        except AgentError:
            # The VM left "running" under the command (a standby or stop in another
            # request): that is the conflict to report, not a failing guest.
            now, _ = await derive_state(paths)
            if now is not InstanceState.RUNNING:
                raise WrongState(f"instance {name} went {now} during the command") from None
            raise

    def console_path(self, name: str) -> Path:
        return self.data_root.instance(self._find(name).id).serial_log

    async def console(self, name: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        """Up to `limit` bytes of the serial console log from `offset` (b"" at its end)."""
        path = self.console_path(name)

        def read() -> bytes:
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    return f.read(limit)
            except FileNotFoundError:
                return b""

        return await asyncio.to_thread(read)

    def paths(self, name: str) -> InstancePaths:
        return self.data_root.instance(self._find(name).id)
