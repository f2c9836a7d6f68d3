"""The instance manager: the entry point for every operation on the instances of one data
root (the CLI and the API call only this). Each operation is one module in
`torpor.operations`; the manager holds the instance for it (`Registry.locked`, which
checks the state against instances/states.py), calls it and says what became of the
instance.

Each method imports its operation's module where it runs it: a CLI call loads only the
operation it makes (`torpor list` needs none of them; see bench/cli_bench.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from torpor.errors import InvalidArgument
from torpor.fsutil import allocated_bytes
from torpor.instances.context import Settings
from torpor.instances.info import CompressionState, InstanceInfo
from torpor.instances.metadata import DEFAULT_DISK, DEFAULT_MEMORY, InstanceState
from torpor.instances.snapshotrecord import SnapshotInfo, all_records, find_record
from torpor.instances.states import Action
from torpor.jobs import compression as compression_jobs
from torpor.operations.registry import Registry
from torpor.paths import DataRoot, InstancePaths
from torpor.tasks import to_thread

if TYPE_CHECKING:
    from torpor.guest.result import ExecResult
    from torpor.hypervisor.accel import AccelChoice
    from torpor.hypervisor.vmconfig import PortForward
    from torpor.images.builtin import GuestImage
    from torpor.images.source import OciSource
    from torpor.instances.metadata import CompressionPolicy, MemoryBacking, NetworkMode
    from torpor.instances.snapshotrecord import SnapshotRecord
    from torpor.instances.states import TargetState
    from torpor.operations.health import Problem
    from torpor.operations.images import ImageInfo
    from torpor.operations.remote import PushReport, RemoteDeleteReport, RemoteSnapshotInfo

__all__ = ["DEFAULT_DISK", "DEFAULT_MEMORY", "InstanceInfo", "InstanceManager"]


MAX_HOLD = 7 * 24 * 3600.0  # a week: a hold is for a client about to come, not forever


class InstanceManager:
    remote = False  # in-process (api/client.py's RemoteManager: served by torpord)

    def __init__(self, data_root: Path, settings: Settings | None = None,
                 lock_wait: float | None = None) -> None:
        self.data_root = DataRoot(data_root)
        self.settings = settings or Settings()
        self.registry = Registry(self.data_root, self.settings, lock_wait)
        # Told after each standby: the daemon's restore pool (api/pool.py) fills then.
        self.after_standby: Callable[[], None] | None = None

    # --- lookup ---------------------------------------------------------------------

    def instance_names(self) -> set[str]:
        return self.registry.instance_names()

    async def get(self, name: str) -> InstanceInfo:
        return await self.registry.get(name)

    async def list_all(self) -> list[InstanceInfo]:
        """Every instance, by name; their QEMUs are asked for their state at the same time
        (one slow or hung monitor costs its own 2 s query timeout once, not once per VM)."""
        metas = sorted(await to_thread(self.registry.all_metadata),
                       key=lambda meta: meta.name)
        return list(await asyncio.gather(*(self.registry.info(meta) for meta in metas)))

    def paths(self, name: str) -> InstancePaths:
        return self.data_root.instance(self.registry.find(name).id)

    # --- background compression ----------------------------------------------------------

    def compression_states(self) -> list[CompressionState]:
        """Each instance's and stored snapshot's background compression state (metrics)."""
        subjects = [(compression_jobs.Subject.instance(m.id), m.compression_plan)
                    for m in self.registry.all_metadata()]
        subjects += [(compression_jobs.Subject.snapshot(r.id), r.compression_plan)
                     for r in all_records(self.data_root)]
        return [compression_jobs.status(self.data_root, subject, plan).state
                for subject, plan in subjects]

    def recover_jobs(self) -> list[str]:
        """Re-queue background compression plans whose worker is gone (a restart, a killed
        worker); clear plans whose instance left standby or whose raw file is gone.
        Stored snapshots' plans likewise. Returns what it did, one line per plan."""
        done = []
        for meta in self.registry.all_metadata():
            line = compression_jobs.requeue(self.data_root,
                                            compression_jobs.Subject.instance(meta.id),
                                            meta.compression_plan, self.settings)
            if line:
                done.append(f"{meta.name}: {line}")
        for record in all_records(self.data_root):
            line = compression_jobs.requeue(self.data_root,
                                            compression_jobs.Subject.snapshot(record.id),
                                            record.compression_plan, self.settings)
            if line:
                done.append(f"snapshot {record.name} of {record.source_name}: {line}")
        return done

    # --- health -------------------------------------------------------------------------

    async def check(self, *, repair: bool = False) -> list[Problem]:
        """Every inconsistency `torpor check` knows in this data root; with `repair`, fix
        what is safe to fix and say, per problem, whether it is gone."""
        from torpor.operations import health

        if repair:
            return await health.repair(self.registry)
        return await health.scan(self.data_root, self.registry.settings.network_bridge)

    # --- create / delete --------------------------------------------------------------

    async def create(self, name: str, *, memory_bytes: int = DEFAULT_MEMORY, cpus: int = 1,
                     disk_bytes: int = DEFAULT_DISK, image: GuestImage | None = None,
                     oci: OciSource | None = None,
                     accel: AccelChoice = "auto",
                     port_forwards: list[PortForward] | None = None,
                     snapshot_policy: CompressionPolicy | None = None,
                     memory_backing: MemoryBacking = "anonymous",
                     network: NetworkMode | None = None,
                     publish: list[str] | None = None,
                     allow_peers: bool = False) -> InstanceInfo:
        from torpor.operations import create as create_op

        meta = await create_op.create(
            self.registry, name, memory_bytes=memory_bytes, cpus=cpus, disk_bytes=disk_bytes,
            image=image, oci=oci, accel=accel, port_forwards=port_forwards,
            snapshot_policy=snapshot_policy, memory_backing=memory_backing,
            network_mode=network, publish=publish, allow_peers=allow_peers)
        return await self.registry.info(meta)

    # --- images -------------------------------------------------------------------------

    async def image_pull(self, ref: str, *, insecure: bool = False,
                         progress: Callable[[int, int], None] | None = None) -> ImageInfo:
        from torpor.operations import images

        return await images.pull(self.registry, ref, insecure=insecure, progress=progress)

    async def image_import(self, path: Path, reference: str | None = None) -> ImageInfo:
        from torpor.operations import images

        return await images.import_archive(self.registry, path, reference)

    async def image_list(self) -> list[ImageInfo]:
        from torpor.operations import images

        return await images.list_images(self.registry)

    async def image_remove(self, ref: str) -> None:
        from torpor.operations import images

        await images.remove(self.registry, ref)

    async def delete(self, name: str, *, force: bool = False) -> None:
        from torpor.operations import delete as delete_op

        await delete_op.delete(self.registry, name, force=force)

    # --- lifecycle --------------------------------------------------------------------

    async def start(self, name: str, *, wait_agent: bool = True) -> InstanceInfo:
        from torpor.operations import lifecycle

        async with self.registry.locked(name, Action.START) as ctx:
            await lifecycle.start(ctx, wait_agent=wait_agent)
            return await self.registry.current_info(ctx)

    async def stop(self, name: str, *, timeout: float | None = None,
                   force: bool = False) -> InstanceInfo:
        from torpor.operations import lifecycle

        action = Action.STOP_FORCE if force else Action.STOP
        async with self.registry.locked(name, action) as ctx:
            await lifecycle.stop(ctx, timeout=timeout, force=force)
            return await self.registry.current_info(ctx)

    async def standby(self, name: str, policy: CompressionPolicy | None = None
                      ) -> InstanceInfo:
        """Save the machine state and stop QEMU. `policy` overrides the instance's."""
        from torpor.operations import standby as standby_op

        if policy is not None:
            policy.effective_level()
        async with self.registry.locked(name, Action.STANDBY) as ctx:
            await standby_op.standby(ctx, policy)
            info = await self.registry.current_info(ctx)
        if self.after_standby is not None:  # the daemon's restore pool fills
            self.after_standby()
        return info

    async def restore(self, name: str) -> InstanceInfo:
        from torpor.operations import restore as restore_op

        async with self.registry.locked(name, Action.RESTORE) as ctx:
            await restore_op.restore(ctx, self.registry.reaper)
            return await self.registry.current_info(ctx)

    async def wake(self, name: str, *, wait: float) -> bool:
        """Traffic for the instance: restore it if it is in standby (waiting up to `wait`
        seconds for an operation on it, such as a standby finishing, to end first).
        False if it was running already."""
        from torpor.operations import lifecycle
        from torpor.operations import restore as restore_op

        async with self.registry.locked(name, Action.WAKE, wait=wait) as ctx:
            if ctx.state is InstanceState.STANDBY:
                await restore_op.restore(ctx, self.registry.reaper)
                return True
            if ctx.state is InstanceState.PAUSED:  # left paused by someone: it runs again
                await lifecycle.resume(ctx)
            return False

    # --- idle policy and holds --------------------------------------------------------------

    async def set_auto_standby(self, name: str, seconds: float | None) -> None:
        """Standby after `seconds` idle (0: never; None: the server's default)."""
        if seconds is not None and seconds < 0:
            raise InvalidArgument("--auto-standby cannot be negative")
        async with self.registry.locked(name, Action.CONFIGURE) as ctx:
            ctx.meta.auto_standby = seconds
            await to_thread(ctx.meta.save, ctx.paths.metadata)

    async def hold(self, name: str, seconds: float) -> InstanceInfo:
        """Keep the instance awake for `seconds` (replacing any hold it has)."""
        from torpor.instances import hold

        if not 0 < seconds <= MAX_HOLD:
            raise InvalidArgument(f"a hold lasts more than 0 s and at most {MAX_HOLD:.0f} s")
        meta = await to_thread(self.registry.find, name)
        await to_thread(hold.hold, self.data_root.instance(meta.id), seconds)
        return await self.registry.info(meta)

    async def release(self, name: str) -> InstanceInfo:
        from torpor.instances import hold

        meta = await to_thread(self.registry.find, name)
        await to_thread(hold.release, self.data_root.instance(meta.id))
        return await self.registry.info(meta)

    async def resume(self, name: str) -> InstanceInfo:
        """A VM left paused (by an operation that was killed, or by hand) runs again."""
        from torpor.operations import lifecycle

        async with self.registry.locked(name, Action.RESUME) as ctx:
            await lifecycle.resume(ctx)
            return await self.registry.current_info(ctx)

    async def set_policy(self, name: str, policy: CompressionPolicy | None) -> None:
        if policy is not None:
            policy.effective_level()
        async with self.registry.locked(name, Action.CONFIGURE) as ctx:
            ctx.meta.snapshot_policy = policy
            await to_thread(ctx.meta.save, ctx.paths.metadata)

    # --- stored snapshots and forks -------------------------------------------------------

    async def snapshot_create(self, name: str, snapshot_name: str,
                              tags: dict[str, str] | None = None, *,
                              serial: bool = False,
                              compression: CompressionPolicy | None = None) -> SnapshotInfo:
        from torpor.operations import snapshots

        async with self.registry.locked(name, Action.SNAPSHOT) as ctx:
            record = await snapshots.create(ctx, snapshot_name, tags or {}, serial=serial,
                                            compression=compression)
        return self._snapshot_info(record)

    def snapshot_list(self, source: str | None = None) -> list[SnapshotInfo]:
        source_id = self.registry.find(source).id if source else None
        return [self._snapshot_info(r) for r in all_records(self.data_root)
                if source_id in (None, r.source_id)]

    def snapshot_get(self, snapshot: str, source: str | None = None) -> SnapshotInfo:
        return self._snapshot_info(self._snapshot_record(snapshot, source))

    def _snapshot_record(self, snapshot: str, source: str | None) -> SnapshotRecord:
        source_id = self.registry.find(source).id if source else None
        return find_record(self.data_root, snapshot, source_id)

    def _snapshot_info(self, record: SnapshotRecord) -> SnapshotInfo:
        status = compression_jobs.status(self.data_root,
                                         compression_jobs.Subject.snapshot(record.id),
                                         record.compression_plan)
        fields = record.model_dump(exclude={"compression_plan"})
        stored = compression_jobs.snapshot_stored_state(self.data_root, record.id)
        if stored is not None:
            fields["state_codec"], fields["state_bytes"] = stored
        stored_bytes = allocated_bytes(self.data_root.snapshot(record.id).root)
        return SnapshotInfo(**fields, compression=status, stored_bytes=stored_bytes)

    def snapshot_dependents(self, snapshot_id: str) -> list[str]:
        """Instances forked from the snapshot, or mapping its memory file."""
        from torpor.operations import snapshots

        return snapshots.dependents(self.data_root, snapshot_id, self.registry.all_metadata())

    async def snapshot_delete(self, snapshot: str, source: str | None = None) -> None:
        from torpor.instances.locking import file_lock
        from torpor.operations import snapshots

        async with file_lock(self.data_root.registry_lock, what="the instance registry"):
            record = await to_thread(self._snapshot_record, snapshot, source)
            users = await to_thread(self.snapshot_dependents, record.id)
            await snapshots.remove(self.data_root, record, users, self.registry.reaper)

    async def snapshot_restore(self, name: str, snapshot: str) -> InstanceInfo:
        """Replace the instance's disk and machine state with a snapshot of it."""
        from torpor.operations import snapshots

        async with self.registry.locked(name, Action.SNAPSHOT_RESTORE) as ctx:
            record = find_record(self.data_root, snapshot, ctx.meta.id)
            await snapshots.restore_into(ctx, record)
            return await self.registry.current_info(ctx)

    async def snapshot_fork(self, snapshot: str, new_name: str, *, count: int = 1,
                            target_state: TargetState = "running",
                            source: str | None = None) -> list[InstanceInfo]:
        from torpor.operations import fork as fork_op

        record = await to_thread(self._snapshot_record, snapshot, source)
        return await fork_op.from_snapshot(self.registry, record, new_name, count=count,
                                           target_state=target_state)

    # --- snapshots in object storage (operations/remote.py) ---------------------------------

    async def snapshot_push(self, snapshot: str, url: str, *, source: str | None = None,
                            remote_name: str | None = None) -> PushReport:
        """Upload a stored snapshot to s3://BUCKET/PREFIX (the chunks the bucket lacks)."""
        from torpor.operations import remote, snapshots

        record = await to_thread(self._snapshot_record, snapshot, source)

        def mapped() -> bool:
            return bool(snapshots.dependents(self.data_root, record.id,
                                             self.registry.all_metadata()))

        return await remote.push(self.data_root, self.settings, record, url, remote_name,
                                 mapped)

    async def snapshot_pull(self, url: str, *, name: str | None = None) -> SnapshotInfo:
        """Download s3://BUCKET/PREFIX/SNAPSHOT into a stored snapshot of this host."""
        from torpor.operations import remote

        record = await remote.pull(self.data_root, self.settings, url, name)
        return self._snapshot_info(record)

    async def remote_list(self, url: str) -> list[RemoteSnapshotInfo]:
        from torpor.operations import remote

        return await remote.remote_list(url)

    async def remote_delete(self, url: str) -> RemoteDeleteReport:
        from torpor.operations import remote

        return await remote.remote_delete(url)

    async def fork(self, source: str, new_name: str, *, count: int = 1,
                   target_state: TargetState = "running") -> list[InstanceInfo]:
        """Fork a running, standby or stopped instance into `count` copies. A running
        source is snapshotted (overlapped) and keeps running."""
        from torpor.operations import fork as fork_op

        return await fork_op.from_instance(self.registry, source, new_name, count=count,
                                           target_state=target_state)

    # --- guest access -----------------------------------------------------------------

    async def exec(self, name: str, argv: list[str], *, input: bytes | None = None,
                   timeout: float = 60.0) -> ExecResult:
        """Run `argv` in a running guest (operations/guest_exec.py)."""
        from torpor.operations.guest_exec import exec_command

        return await exec_command(self.registry, name, argv, input=input, timeout=timeout)

    def console_path(self, name: str) -> Path:
        return self.data_root.instance(self.registry.find(name).id).serial_log

    def logs_path(self, name: str) -> Path:
        """An image instance's main process output; the built-in guest has no main
        process, so its console."""
        meta = self.registry.find(name)
        paths = self.data_root.instance(meta.id)
        return paths.app_log if meta.image.kind == "oci" else paths.serial_log

    async def console(self, name: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        """Up to `limit` bytes of the serial console log from `offset` (b"" at its end)."""
        return await self._read_log(self.console_path, name, offset, limit)

    async def logs(self, name: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        """Up to `limit` bytes of the instance's logs (logs_path) from `offset`."""
        return await self._read_log(self.logs_path, name, offset, limit)

    async def _read_log(self, where: Callable[[str], Path], name: str, offset: int,
                        limit: int) -> bytes:
        path = await to_thread(where, name)

        def read() -> bytes:
            try:
                with open(path, "rb") as f:
                    if offset >= os.fstat(f.fileno()).st_size:
                        return b""  # (a seek past what the filesystem allows is EINVAL)
                    f.seek(offset)
                    return f.read(limit)
            except FileNotFoundError:
                return b""

        return await to_thread(read)
