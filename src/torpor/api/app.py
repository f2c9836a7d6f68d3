"""The REST API: one FastAPI app over one instance manager.

Long operations run inside the request (the response is their result) and are tracked
as operation resources meanwhile: a client that sends `X-Torpor-Operation: <id>` can poll
GET /operations/{id} for byte progress and phase timings. Every endpoint but /healthz
needs `Authorization: Bearer <token>`. Errors are `{code, message}` with 400 bad input,
401 auth, 404 unknown, 408 wait timeout, 409 wrong state/busy/exists, 422 stored state
failing its checks, 501 unsupported, 502 QEMU/guest/host failure; 500 only for bugs.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures at
# runtime, and they name dependencies defined inside create_app.
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path as FsPath
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from torpor import __version__
from torpor.api.bodylimit import BodyLimit
from torpor.api.errors import Timeout, Unauthorized, http_status
from torpor.api.metrics import CONTENT_TYPE, Metrics
from torpor.api.models import (
    MAX_TIMEOUT,
    NAME_PATTERN,
    OPERATION_HEADER,
    OPERATION_ID_PATTERN,
    CreateRequest,
    ErrorBody,
    ExecRequest,
    ExecResponse,
    ForkRequest,
    Health,
    Operation,
    PolicyRequest,
    SnapshotRequest,
    StandbyRequest,
    StartRequest,
    StopRequest,
    to_policy,
)
from torpor.api.tracker import OperationTracker, check_operation_id
from torpor.errors import InvalidArgument, TorporError
from torpor.instances.info import InstanceInfo
from torpor.instances.metadata import InstanceState
from torpor.instances.snapshotrecord import SnapshotRecord
from torpor.manager import InstanceManager
from torpor.units import format_seconds

log = logging.getLogger("torpor.api")
InstanceName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=63,
                                   description="instance name or id")]
SnapshotName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=63,
                                   description="snapshot name or id")]
SourceFilter = Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=63,
                                           description="the snapshot's source instance")]
OperationId = Annotated[str, Path(pattern=OPERATION_ID_PATTERN)]
CONSOLE_NEXT = "X-Torpor-Next-Offset"
WAIT_POLL = 0.1

_ERROR_STATUSES = (400, 401, 404, 409, 422, 501, 502)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in _ERROR_STATUSES}


def _error(status: int, code: str, message: str,
           headers: Mapping[str, str] | None = None) -> JSONResponse:
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(ErrorBody(code=code, message=message).model_dump(), status_code=status,
                        headers=headers)


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def _query_names(dependant: Dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def known_query_only(request: Request) -> None:
    """A misspelt query parameter (?forse=true) is an error, not silently ignored."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = _query_names(route.dependant)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise InvalidArgument(f"unknown query parameter(s): {', '.join(unknown)}")


def _install_error_handlers(app: FastAPI) -> None:
    async def torpor_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, TorporError)
        return _error(http_status(exc), exc.code, exc.message)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(400, InvalidArgument.code, f"{where}: {first.get('msg')}")

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed",
                413: "too_large"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method the path has, not just one route's
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        return _error(exc.status_code, code, str(exc.detail), headers)

    async def bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=exc)
        return _error(500, "internal", "internal error (see the daemon's log)")

    app.add_exception_handler(TorporError, torpor_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, bug)


SLOW_CALLBACK_ENV = "TORPOR_SLOW_CALLBACK"


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Before serving: FastAPI builds its routes' validators on the first request that
    reaches the router (~50-80 ms here, on the event loop, while other requests wait), so
    one request that matches no route (so meets them all) pays it now. With
    TORPOR_SLOW_CALLBACK=SECONDS, asyncio's debug mode then logs every callback that holds
    the event loop longer than that ("Executing … took …"): a test runs the daemon so to
    prove no request blocks the others."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://torpord") as warm_up:
        await warm_up.get("/-/warm-up")  # matches no route: every route is prepared
    threshold = os.environ.get(SLOW_CALLBACK_ENV)
    if threshold:
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = float(threshold)
    yield


def create_app(manager: InstanceManager, token: str) -> FastAPI:
    metrics = Metrics(manager.data_root, manager.compression_states)
    operations = OperationTracker(metrics)
    bearer = HTTPBearer(auto_error=False, description="the token in <data-root>/api-token")

    def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None,
                                          Depends(bearer)]) -> None:
        if credentials is None or not secrets.compare_digest(
                credentials.credentials.encode(), token.encode()):
            raise Unauthorized("missing or wrong bearer token")

    def operation_id(response: Response, x_torpor_operation: Annotated[
            str | None, Header(description="name this operation to poll its progress",
                               pattern=OPERATION_ID_PATTERN)
    ] = None) -> str:
        op_id = check_operation_id(x_torpor_operation)
        response.headers[OPERATION_HEADER] = op_id
        return op_id

    OpId = Annotated[str, Depends(operation_id)]
    api = APIRouter(dependencies=[Depends(authorized), Depends(known_query_only)],
                    responses=ERROR_RESPONSES)
    app = FastAPI(title="torpord", version=__version__, openapi_url=None, docs_url=None,
                  redoc_url=None, description=__doc__, lifespan=_lifespan)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit)

    # --- service ----------------------------------------------------------------------

    @app.get("/healthz", tags=["service"])
    async def health() -> Health:
        """Liveness, without auth."""
        return Health(version=__version__)

    @api.get("/openapi.json", tags=["service"], include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @api.get("/metrics", tags=["service"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}})
    async def prometheus_metrics() -> Response:
        """Prometheus text format."""
        return Response(await asyncio.to_thread(metrics.render), media_type=CONTENT_TYPE)

    @api.get("/operations", tags=["operations"])
    async def list_operations(instance: SourceFilter = None) -> list[Operation]:
        return operations.list(instance)

    @api.get("/operations/{op_id}", tags=["operations"])
    async def get_operation(op_id: OperationId) -> Operation:
        return operations.get(op_id)

    # --- instances --------------------------------------------------------------------

    @api.get("/instances", tags=["instances"])
    async def list_instances() -> list[InstanceInfo]:
        return await manager.list_all()

    @api.post("/instances", tags=["instances"], status_code=201)
    async def create_instance(body: CreateRequest, op: OpId) -> InstanceInfo:
        async with operations.track(op, "create", body.name):
            return await manager.create(body.name, memory_bytes=body.memory_mib << 20,
                                        cpus=body.cpus, disk_bytes=body.disk_mib << 20,
                                        snapshot_policy=to_policy(body.snapshot_policy),
                                        memory_backing=body.memory_backing)

    @api.get("/instances/{name}", tags=["instances"])
    async def get_instance(name: InstanceName) -> InstanceInfo:
        return await manager.get(name)

    @api.delete("/instances/{name}", tags=["instances"], status_code=204,
                response_class=Response)
    async def delete_instance(name: InstanceName, op: OpId, force: bool = False) -> Response:
        async with operations.track(op, "delete", name):
            await manager.delete(name, force=force)
        return Response(status_code=204)

    @api.post("/instances/{name}/start", tags=["instances"])
    async def start_instance(name: InstanceName, op: OpId, body: StartRequest | None = None
                             ) -> InstanceInfo:
        async with operations.track(op, "start", name):
            return await manager.start(name, wait_agent=(body or StartRequest()).wait_agent)

    @api.post("/instances/{name}/stop", tags=["instances"])
    async def stop_instance(name: InstanceName, op: OpId, body: StopRequest | None = None
                            ) -> InstanceInfo:
        body = body or StopRequest()
        async with operations.track(op, "stop", name):
            return await manager.stop(name, timeout=body.timeout, force=body.force)

    @api.post("/instances/{name}/standby", tags=["instances"])
    async def standby_instance(name: InstanceName, op: OpId, body: StandbyRequest | None = None
                               ) -> InstanceInfo:
        """Save the machine state and stop QEMU (compression: request > instance > server)."""
        async with operations.track(op, "standby", name):
            return await manager.standby(name, to_policy(body.compression) if body else None)

    @api.post("/instances/{name}/restore", tags=["instances"])
    async def restore_instance(name: InstanceName, op: OpId) -> InstanceInfo:
        async with operations.track(op, "restore", name):
            return await manager.restore(name)

    @api.post("/instances/{name}/resume", tags=["instances"])
    async def resume_instance(name: InstanceName, op: OpId) -> InstanceInfo:
        """A VM left paused by an interrupted operation runs again."""
        async with operations.track(op, "resume", name):
            return await manager.resume(name)

    @api.put("/instances/{name}/policy", tags=["instances"])
    async def set_policy(name: InstanceName, body: PolicyRequest) -> InstanceInfo:
        await manager.set_policy(name, to_policy(body.policy))
        return await manager.get(name)

    @api.post("/instances/{name}/fork", tags=["instances"], status_code=201)
    async def fork_instance(name: InstanceName, body: ForkRequest, op: OpId) -> list[InstanceInfo]:
        async with operations.track(op, "fork", name):
            return await manager.fork(name, body.new_name, count=body.count,
                                      target_state=body.target_state)

    @api.post("/instances/{name}/exec", tags=["instances"])
    async def exec_in_instance(name: InstanceName, body: ExecRequest) -> ExecResponse:
        try:
            stdin = base64.b64decode(body.stdin_b64, validate=True) if body.stdin_b64 else None
        except (binascii.Error, ValueError):
            raise InvalidArgument("stdin_b64 is not base64") from None
        result = await manager.exec(name, body.argv, input=stdin, timeout=body.timeout)
        return ExecResponse(exit_code=result.exit_code, signal=result.signal,
                            stdout_b64=base64.b64encode(result.stdout).decode(),
                            stderr_b64=base64.b64encode(result.stderr).decode())

    @api.get("/instances/{name}/console", tags=["instances"], response_class=Response,
             responses={200: {"content": {"application/octet-stream": {
                 "schema": {"type": "string", "format": "binary"}}},
                 "headers": {CONSOLE_NEXT: {"schema": {"type": "integer"}}}}})
    async def console(name: InstanceName,
                      offset: Annotated[int, Query(ge=0, le=1 << 50)] = 0,
                      limit: Annotated[int, Query(ge=1, le=1 << 24)] = 1 << 20) -> Response:
        """The serial console log from `offset`; the next offset is in a header."""
        data = await manager.console(name, offset, limit)
        return Response(data, media_type="application/octet-stream",
                        headers={CONSOLE_NEXT: str(offset + len(data))})

    @api.get("/instances/{name}/wait", tags=["instances"],
             responses={408: {"model": ErrorBody}})
    async def wait_for_state(name: InstanceName, state: InstanceState,
                             timeout: Annotated[float, Query(ge=0, le=MAX_TIMEOUT)] = 60.0
                             ) -> InstanceInfo:
        """Return once the instance is in `state`; 408 if it is not within `timeout` s."""
        deadline = time.monotonic() + timeout
        while True:
            info = await manager.get(name)
            if info.state is state:
                return info
            if time.monotonic() >= deadline:
                raise Timeout(f"instance {name} is {info.state}, not {state}, after "
                              f"{format_seconds(timeout)}")
            await asyncio.sleep(WAIT_POLL)

    # --- snapshots --------------------------------------------------------------------

    @api.post("/instances/{name}/snapshots", tags=["snapshots"], status_code=201)
    async def create_snapshot(name: InstanceName, body: SnapshotRequest, op: OpId
                              ) -> SnapshotRecord:
        snap_name = body.name or time.strftime("snap-%Y%m%d-%H%M%S")
        async with operations.track(op, "snapshot", name):
            return await manager.snapshot_create(name, snap_name, body.tags,
                                                 serial=body.serial,
                                                 compression=to_policy(body.compression))

    @api.post("/instances/{name}/snapshots/{snapshot}/restore", tags=["snapshots"])
    async def restore_snapshot(name: InstanceName, snapshot: SnapshotName, op: OpId
                               ) -> InstanceInfo:
        """Replace a (not running) instance's disk and state with one of its snapshots."""
        async with operations.track(op, "snapshot-restore", name):
            return await manager.snapshot_restore(name, snapshot)

    @api.get("/snapshots", tags=["snapshots"])
    async def list_snapshots(instance: SourceFilter = None) -> list[SnapshotRecord]:
        return manager.snapshot_list(instance)

    @api.get("/snapshots/{snapshot}", tags=["snapshots"])
    async def get_snapshot(snapshot: SnapshotName, instance: SourceFilter = None) -> SnapshotRecord:
        return manager.snapshot_get(snapshot, instance)

    @api.delete("/snapshots/{snapshot}", tags=["snapshots"], status_code=204,
                response_class=Response)
    async def delete_snapshot(snapshot: SnapshotName, op: OpId, instance: SourceFilter = None
                              ) -> Response:
        source = manager.snapshot_get(snapshot, instance).source_name  # 404 before tracking
        async with operations.track(op, "snapshot-delete", source):
            await manager.snapshot_delete(snapshot, instance)
        return Response(status_code=204)

    @api.post("/snapshots/{snapshot}/fork", tags=["snapshots"], status_code=201)
    async def fork_snapshot(snapshot: SnapshotName, body: ForkRequest, op: OpId,
                            instance: SourceFilter = None) -> list[InstanceInfo]:
        source = manager.snapshot_get(snapshot, instance).source_name
        async with operations.track(op, "snapshot-fork", source):
            return await manager.snapshot_fork(snapshot, body.new_name, count=body.count,
                                               target_state=body.target_state,
                                               source=instance)

    app.include_router(api)
    return app


def openapi_document() -> str:
    """The OpenAPI document as committed in openapi.json (no data root is touched)."""
    app = create_app(InstanceManager(FsPath("/nonexistent")), token="unused")
    return json.dumps(app.openapi(), indent=2, sort_keys=True)
