"""Delete: an instance's QEMU killed, its directory and its job's files gone, and an
automatic snapshot made for forks removed with the last fork that needed it."""

from __future__ import annotations

import contextlib

from torpor import faults
from torpor.errors import NotFound
from torpor.instances.context import InstanceContext
from torpor.instances.locking import file_lock
from torpor.instances.snapshotrecord import find_record
from torpor.instances.states import Action
from torpor.jobs import compression as compression_jobs
from torpor.operations import lifecycle, network, snapshots
from torpor.operations.registry import Registry
from torpor.tasks import to_thread


async def delete(registry: Registry, name: str, *, force: bool = False) -> None:
    action = Action.DELETE_FORCE if force else Action.DELETE
    async with registry.locked(name, action) as ctx:
        if ctx.record is not None:
            await lifecycle.terminate(ctx, ctx.record.process())
        await to_thread(network.stop_publisher, ctx.paths)
        faults.point("delete.killed")
        key = compression_jobs.instance_job_key(ctx.meta.id)
        await to_thread(compression_jobs.cancel_and_wait, ctx.data_root, key)
        await registry.reaper.remove(ctx.paths.root)  # in the daemon: the bytes after the call
        try:
            faults.point("delete.removed")
        finally:  # the instance is gone: what is left of it goes too, in one joined
            # thread (a Ctrl-C here finishes it; pyroute2 runs its own event loop)
            await to_thread(_forget, ctx, key)
        origin = ctx.meta.origin_snapshot
    await drop_auto_snapshot(registry, origin)


def _forget(ctx: InstanceContext, job_key: str) -> None:
    """A deleted instance's address, job files and lock file."""
    network.release(ctx.data_root, ctx.settings, ctx.meta)
    compression_jobs.remove_job_files(ctx.data_root, job_key)
    with contextlib.suppress(FileNotFoundError):
        ctx.data_root.instance_lock(ctx.meta.id).unlink()


async def drop_auto_snapshot(registry: Registry, snapshot_id: str | None) -> None:
    """A snapshot torpor made for memory-file forks goes with the last of them."""
    if snapshot_id is None:
        return
    data_root = registry.data_root
    async with file_lock(data_root.registry_lock, what="the instance registry"):
        try:
            record = find_record(data_root, snapshot_id)
        except NotFound:
            return
        users = snapshots.dependents(data_root, record.id,
                                     await to_thread(registry.all_metadata))
        if record.tags.get(snapshots.AUTO_TAG) and not users:
            await snapshots.remove(data_root, record, [], registry.reaper)
