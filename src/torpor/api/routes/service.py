"""The service itself: liveness, the OpenAPI document, metrics, operations."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
from typing import Any

from fastapi import APIRouter, Request, Response

from torpor import __version__
from torpor.api.deps import (
    ERROR_RESPONSES,
    GUARDED,
    MetricsDep,
    OperationId,
    SourceFilter,
    Tracker,
)
from torpor.api.metrics import CONTENT_TYPE
from torpor.api.models import Health, Operation
from torpor.tasks import to_thread

public = APIRouter()
router = APIRouter(dependencies=GUARDED, responses=ERROR_RESPONSES)


@public.get("/healthz", tags=["service"])
async def health() -> Health:
    """Liveness, without auth."""
    return Health(version=__version__)


@router.get("/openapi.json", tags=["service"], include_in_schema=False)
async def openapi(request: Request) -> dict[str, Any]:
    document: dict[str, Any] = request.app.openapi()
    return document


@router.get(
    "/metrics",
    tags=["service"],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
)
async def prometheus_metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(await to_thread(metrics.render), media_type=CONTENT_TYPE)


@router.get("/operations", tags=["operations"])
async def list_operations(operations: Tracker, instance: SourceFilter = None) -> list[Operation]:
    return operations.list(instance)


@router.get("/operations/{op_id}", tags=["operations"])
async def get_operation(operations: Tracker, op_id: OperationId) -> Operation:
    return operations.get(op_id)
