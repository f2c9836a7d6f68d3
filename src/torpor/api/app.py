"""The REST API: one FastAPI app over one instance manager.

Long operations run inside the request (the response is their result) and are tracked
as operation resources meanwhile: a client that sends `X-Torpor-Operation: <id>` can poll
GET /operations/{id} for byte progress and phase timings. Every endpoint but /healthz
needs `Authorization: Bearer <token>`. Errors are `{code, message}` with 400 bad input,
401 auth, 404 unknown, 408 wait timeout, 409 wrong state/busy/exists, 422 stored state
failing its checks, 501 unsupported, 502 QEMU/guest/host failure; 500 only for bugs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path as FsPath

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from torpor import __version__
from torpor.api.bodylimit import BodyLimit
from torpor.api.errors import http_status
from torpor.api.metrics import Metrics
from torpor.api.models import ErrorBody
from torpor.api.pool import RestorePool
from torpor.api.routes import images, instances, service, snapshots
from torpor.api.sleeper import Sleeper
from torpor.api.tracker import OperationTracker
from torpor.errors import InvalidArgument, TorporError
from torpor.manager import InstanceManager

log = logging.getLogger("torpor.api")
log = logging.getLogger("torpor.api")


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
    sleeper: Sleeper = app.state.sleeper
    pool: RestorePool = app.state.restore_pool
    reaper = app.state.manager.registry.reaper
    # The idle clock and wakes, QEMUs waiting for restores, and the removal of what
    # operations left behind, while we serve (the reaper stops last: it waits for them).
    async with reaper.running(), sleeper.running(), pool.running():
        yield


def create_app(manager: InstanceManager, token: str) -> FastAPI:
    """The app over `manager`: the routes (api/routes/) reach it, the operation tracker
    and the metrics as dependencies (api/deps.py)."""
    app = FastAPI(title="torpord", version=__version__, openapi_url=None, docs_url=None,
                  redoc_url=None, description=__doc__, lifespan=_lifespan)
    app.state.manager = manager
    app.state.token = token
    app.state.metrics = Metrics(manager.data_root, manager.compression_states)
    app.state.tracker = OperationTracker(app.state.metrics)
    app.state.sleeper = Sleeper(manager, app.state.tracker, app.state.metrics)
    app.state.restore_pool = RestorePool(manager)
    app.state.metrics.count_waiting_qemus(app.state.restore_pool.waiting)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit)
    for router in (service.public, service.router, instances.router, snapshots.router,
                   images.router):
        app.include_router(router)
    return app


def openapi_document() -> str:
    """The OpenAPI document as committed in openapi.json (no data root is touched)."""
    app = create_app(InstanceManager(FsPath("/nonexistent")), token="unused")
    return json.dumps(app.openapi(), indent=2, sort_keys=True)
