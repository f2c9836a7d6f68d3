"""Instances: create, list, lifecycle, standby and restore, fork, exec, console, wait."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio
import base64
import binascii
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from torpor.api.deps import (
    ERROR_RESPONSES,
    GUARDED,
    InstanceName,
    Manager,
    OpId,
    SleeperDep,
    Tracker,
)
from torpor.api.errors import Timeout
from torpor.api.models import (
    MAX_TIMEOUT,
    CreateRequest,
    ErrorBody,
    ExecRequest,
    ExecResponse,
    ForkRequest,
    HoldRequest,
    PolicyRequest,
    StandbyRequest,
    StartRequest,
    StopRequest,
    WakeRecord,
    WakeResult,
    to_policy,
)
from torpor.errors import InvalidArgument
from torpor.images.source import OciSource
from torpor.instances.info import InstanceInfo
from torpor.instances.metadata import InstanceState
from torpor.units import format_seconds

CONSOLE_NEXT = "X-Torpor-Next-Offset"
WAIT_POLL = 0.1
router = APIRouter(dependencies=GUARDED, responses=ERROR_RESPONSES)


@router.get("/instances", tags=["instances"])
async def list_instances(
    manager: Manager,
) -> list[InstanceInfo]:
    return await manager.list_all()


@router.post("/instances", tags=["instances"], status_code=201)
async def create_instance(
    manager: Manager, body: CreateRequest, op: OpId, operations: Tracker
) -> InstanceInfo:
    async with operations.track(op, "create", body.name):
        return await manager.create(
            body.name,
            memory_bytes=body.memory_mib << 20,
            cpus=body.cpus,
            disk_bytes=body.disk_mib << 20,
            snapshot_policy=to_policy(body.snapshot_policy),
            memory_backing=body.memory_backing,
            network=body.network,
            publish=body.publish,
            allow_peers=body.allow_peers,
            oci=None if body.image is None else OciSource(
                reference=body.image, entrypoint=body.entrypoint, cmd=body.cmd,
                env=body.env, workdir=body.workdir, user=body.user, insecure=body.insecure),
        )


@router.get("/instances/{name}", tags=["instances"])
async def get_instance(manager: Manager, name: InstanceName) -> InstanceInfo:
    return await manager.get(name)


@router.delete("/instances/{name}", tags=["instances"], status_code=204, response_class=Response)
async def delete_instance(
    manager: Manager, name: InstanceName, op: OpId, operations: Tracker, force: bool = False
) -> Response:
    async with operations.track(op, "delete", name):
        await manager.delete(name, force=force)
    return Response(status_code=204)


@router.post("/instances/{name}/start", tags=["instances"])
async def start_instance(
    manager: Manager,
    name: InstanceName,
    op: OpId,
    operations: Tracker,
    body: StartRequest | None = None,
) -> InstanceInfo:
    async with operations.track(op, "start", name):
        return await manager.start(name, wait_agent=(body or StartRequest()).wait_agent)


@router.post("/instances/{name}/stop", tags=["instances"])
async def stop_instance(
    manager: Manager,
    name: InstanceName,
    op: OpId,
    operations: Tracker,
    body: StopRequest | None = None,
) -> InstanceInfo:
    body = body or StopRequest()
    async with operations.track(op, "stop", name):
        return await manager.stop(name, timeout=body.timeout, force=body.force)


@router.post("/instances/{name}/standby", tags=["instances"])
async def standby_instance(
    manager: Manager,
    name: InstanceName,
    op: OpId,
    operations: Tracker,
    body: StandbyRequest | None = None,
) -> InstanceInfo:
    """Save the machine state and stop QEMU (compression: request > instance > server)."""
    async with operations.track(op, "standby", name):
        return await manager.standby(name, to_policy(body.compression) if body else None)


@router.post("/instances/{name}/restore", tags=["instances"])
async def restore_instance(
    manager: Manager, name: InstanceName, op: OpId, operations: Tracker
) -> InstanceInfo:
    async with operations.track(op, "restore", name):
        return await manager.restore(name)


@router.post("/instances/{name}/resume", tags=["instances"])
async def resume_instance(
    manager: Manager, name: InstanceName, op: OpId, operations: Tracker
) -> InstanceInfo:
    """A VM left paused by an interrupted operation runs again."""
    async with operations.track(op, "resume", name):
        return await manager.resume(name)


@router.put("/instances/{name}/policy", tags=["instances"])
async def set_policy(manager: Manager, name: InstanceName, body: PolicyRequest) -> InstanceInfo:
    """The standby compression and the auto-standby idle time; fields left out stay."""
    if "auto_standby" in body.model_fields_set:
        await manager.set_auto_standby(name, body.auto_standby)
    if "policy" in body.model_fields_set or not body.model_fields_set:
        await manager.set_policy(name, to_policy(body.policy))
    return await manager.get(name)


@router.post("/instances/{name}/hold", tags=["idle"])
async def hold(manager: Manager, name: InstanceName,
               body: HoldRequest | None = None) -> InstanceInfo:
    """Keep the instance awake (no auto-standby) for a while; replaces its hold."""
    return await manager.hold(name, (body or HoldRequest()).duration)


@router.delete("/instances/{name}/hold", tags=["idle"])
async def release(manager: Manager, name: InstanceName) -> InstanceInfo:
    return await manager.release(name)


@router.post("/instances/{name}/wake", tags=["idle"])
async def wake(manager: Manager, sleeper: SleeperDep, name: InstanceName) -> WakeResult:
    """Traffic for the instance (its relay asks): restored if in standby, as an
    operation of kind restore with trigger traffic; concurrent wakes share one restore.
    A stopped instance is refused (409): it does not wake."""
    woke = await sleeper.wake(name)
    return WakeResult(woke=woke, instance=await manager.get(name))


@router.post("/instances/{name}/wakes", tags=["idle"], status_code=204,
             response_class=Response)
async def record_wake(manager: Manager, sleeper: SleeperDep, name: InstanceName,
                      body: WakeRecord) -> None:
    """A relay's account of a wake (its time, or the error that closed the held
    connections): the wake metrics."""
    await manager.get(name)  # an instance of ours
    sleeper.record_wake(name, body.ok, body.seconds, body.error)


@router.post("/instances/{name}/fork", tags=["instances"], status_code=201)
async def fork_instance(
    manager: Manager, name: InstanceName, body: ForkRequest, op: OpId, operations: Tracker
) -> list[InstanceInfo]:
    async with operations.track(op, "fork", name):
        return await manager.fork(
            name, body.new_name, count=body.count, target_state=body.target_state
        )


@router.post("/instances/{name}/exec", tags=["instances"])
async def exec_in_instance(manager: Manager, sleeper: SleeperDep, name: InstanceName,
                           body: ExecRequest) -> ExecResponse:
    try:
        stdin = base64.b64decode(body.stdin_b64, validate=True) if body.stdin_b64 else None
    except (binascii.Error, ValueError):
        raise InvalidArgument("stdin_b64 is not base64") from None
    async with sleeper.busy(name):  # an exec in flight: the instance is not idle
        result = await manager.exec(name, body.argv, input=stdin, timeout=body.timeout)
    return ExecResponse(
        exit_code=result.exit_code,
        signal=result.signal,
        stdout_b64=base64.b64encode(result.stdout).decode(),
        stderr_b64=base64.b64encode(result.stderr).decode(),
        truncated=result.truncated,
    )


# A log read in chunks: the bytes from `offset`, the next offset in a header.
LOG_CHUNK: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "headers": {CONSOLE_NEXT: {"schema": {"type": "integer"}}},
    }
}
Offset = Annotated[int, Query(ge=0, le=1 << 50)]
Limit = Annotated[int, Query(ge=1, le=1 << 24)]


def log_chunk(data: bytes, offset: int) -> Response:
    return Response(data, media_type="application/octet-stream",
                    headers={CONSOLE_NEXT: str(offset + len(data))})


@router.get("/instances/{name}/console", tags=["instances"], response_class=Response,
            responses=LOG_CHUNK)
async def console(manager: Manager, sleeper: SleeperDep, name: InstanceName,
                  offset: Offset = 0, limit: Limit = 1 << 20) -> Response:
    """The serial console log from `offset`; the next offset is in a header."""
    async with sleeper.busy(name):  # someone watches the console: not idle
        return log_chunk(await manager.console(name, offset, limit), offset)


@router.get("/instances/{name}/logs", tags=["instances"], response_class=Response,
            responses=LOG_CHUNK)
async def logs(manager: Manager, name: InstanceName, offset: Offset = 0,
               limit: Limit = 1 << 20) -> Response:
    """An image instance's command output (the built-in guest: its console) from
    `offset`; the next offset is in a header."""
    return log_chunk(await manager.logs(name, offset, limit), offset)


@router.get("/instances/{name}/wait", tags=["instances"], responses={408: {"model": ErrorBody}})
async def wait_for_state(
    manager: Manager,
    name: InstanceName,
    state: InstanceState,
    timeout: Annotated[float, Query(ge=0, le=MAX_TIMEOUT)] = 60.0,
) -> InstanceInfo:
    """Return once the instance is in `state`; 408 if it is not within `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        info = await manager.get(name)
        if info.state is state:
            return info
        if time.monotonic() >= deadline:
            raise Timeout(
                f"instance {name} is {info.state}, not {state}, after {format_seconds(timeout)}"
            )
        await asyncio.sleep(WAIT_POLL)
