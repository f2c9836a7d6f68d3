"""Stored snapshots: create, list, get, delete, restore into the source, fork."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import time
from typing import Annotated

from fastapi import APIRouter, Query, Response

from torpor.api.deps import (
    ERROR_RESPONSES,
    GUARDED,
    InstanceName,
    Manager,
    OpId,
    SnapshotName,
    SourceFilter,
    Tracker,
)
from torpor.api.models import (
    ForkRequest,
    S3Location,
    S3SnapshotUrl,
    SnapshotPullRequest,
    SnapshotPushRequest,
    SnapshotRequest,
    to_policy,
)
from torpor.instances.info import InstanceInfo
from torpor.instances.snapshotrecord import SnapshotInfo
from torpor.operations.remote import PushReport, RemoteDeleteReport, RemoteSnapshotInfo
from torpor.tasks import to_thread

router = APIRouter(dependencies=GUARDED, responses=ERROR_RESPONSES)


@router.post("/instances/{name}/snapshots", tags=["snapshots"], status_code=201)
async def create_snapshot(
    manager: Manager, name: InstanceName, body: SnapshotRequest, op: OpId, operations: Tracker
) -> SnapshotInfo:
    snap_name = body.name or time.strftime("snap-%Y%m%d-%H%M%S")
    async with operations.track(op, "snapshot", name):
        return await manager.snapshot_create(
            name, snap_name, body.tags, serial=body.serial, compression=to_policy(body.compression)
        )


@router.post("/instances/{name}/snapshots/{snapshot}/restore", tags=["snapshots"])
async def restore_snapshot(
    manager: Manager, name: InstanceName, snapshot: SnapshotName, op: OpId, operations: Tracker
) -> InstanceInfo:
    """Replace a (not running) instance's disk and state with one of its snapshots."""
    async with operations.track(op, "snapshot-restore", name):
        return await manager.snapshot_restore(name, snapshot)


@router.get("/snapshots", tags=["snapshots"])
async def list_snapshots(manager: Manager, instance: SourceFilter = None) -> list[SnapshotInfo]:
    return await to_thread(manager.snapshot_list, instance)


@router.get("/snapshots/{snapshot}", tags=["snapshots"])
async def get_snapshot(
    manager: Manager, snapshot: SnapshotName, instance: SourceFilter = None
) -> SnapshotInfo:
    return await to_thread(manager.snapshot_get, snapshot, instance)


@router.delete(
    "/snapshots/{snapshot}", tags=["snapshots"], status_code=204, response_class=Response
)
async def delete_snapshot(
    manager: Manager,
    snapshot: SnapshotName,
    op: OpId,
    operations: Tracker,
    instance: SourceFilter = None,
) -> Response:
    source = (
        await to_thread(manager.snapshot_get, snapshot, instance)
    ).source_name  # 404 before tracking
    async with operations.track(op, "snapshot-delete", source):
        await manager.snapshot_delete(snapshot, instance)
    return Response(status_code=204)


@router.post("/snapshots/{snapshot}/fork", tags=["snapshots"], status_code=201)
async def fork_snapshot(
    manager: Manager,
    snapshot: SnapshotName,
    body: ForkRequest,
    op: OpId,
    operations: Tracker,
    instance: SourceFilter = None,
) -> list[InstanceInfo]:
    source = (await to_thread(manager.snapshot_get, snapshot, instance)).source_name
    async with operations.track(op, "snapshot-fork", source):
        return await manager.snapshot_fork(
            snapshot,
            body.new_name,
            count=body.count,
            target_state=body.target_state,
            source=instance,
        )


# --- snapshots in S3-compatible storage (credentials: the daemon's AWS environment) ----------

@router.post("/snapshots/{snapshot}/push", tags=["remote snapshots"])
async def push_snapshot(manager: Manager, snapshot: SnapshotName, body: SnapshotPushRequest,
                        op: OpId, operations: Tracker, instance: SourceFilter = None
                        ) -> PushReport:
    """Upload to s3://BUCKET/PREFIX the chunks the bucket does not have, then the manifest."""
    async with operations.track(op, "snapshot-push", None):
        return await manager.snapshot_push(snapshot, body.url, source=instance,
                                           remote_name=body.name)


@router.post("/snapshots/pull", tags=["remote snapshots"], status_code=201)
async def pull_snapshot(manager: Manager, body: SnapshotPullRequest, op: OpId,
                        operations: Tracker) -> SnapshotInfo:
    """Download s3://BUCKET/PREFIX/SNAPSHOT (refused first if this host cannot load it)."""
    async with operations.track(op, "snapshot-pull", None):
        return await manager.snapshot_pull(body.url, name=body.name)


@router.get("/remote-snapshots", tags=["remote snapshots"])
async def list_remote_snapshots(manager: Manager, url: Annotated[S3Location, Query()]
                                ) -> list[RemoteSnapshotInfo]:
    return await manager.remote_list(url)


@router.delete("/remote-snapshots", tags=["remote snapshots"])
async def delete_remote_snapshot(manager: Manager, url: Annotated[S3SnapshotUrl, Query()],
                                 op: OpId, operations: Tracker) -> RemoteDeleteReport:
    """Delete s3://BUCKET/PREFIX/SNAPSHOT; chunks other snapshots use stay."""
    async with operations.track(op, "snapshot-remote-delete", None):
        return await manager.remote_delete(url)
