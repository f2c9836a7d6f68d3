"""What the routes share: the manager, the operation tracker and the metrics as
dependencies (set on the app by `create_app`), the bearer check, the operation id of a
long request, and the path and query parameter types."""

# No `from __future__ import annotations`: FastAPI reads these signatures at runtime.
import secrets
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Query, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from torpor.api import OPERATION_HEADER
from torpor.api.errors import Unauthorized
from torpor.api.metrics import Metrics
from torpor.api.models import (
    NAME_PATTERN,
    OPERATION_ID_PATTERN,
    ErrorBody,
)
from torpor.api.sleeper import Sleeper
from torpor.api.tracker import OperationTracker, check_operation_id
from torpor.errors import InvalidArgument
from torpor.manager import InstanceManager

InstanceName = Annotated[
    str, Path(pattern=NAME_PATTERN, max_length=63, description="instance name or id")
]
SnapshotName = Annotated[
    str, Path(pattern=NAME_PATTERN, max_length=63, description="snapshot name or id")
]
SourceFilter = Annotated[
    str | None,
    Query(pattern=NAME_PATTERN, max_length=63, description="the snapshot's source instance"),
]
OperationId = Annotated[str, Path(pattern=OPERATION_ID_PATTERN)]

_ERROR_STATUSES = (400, 401, 404, 409, 422, 501, 502)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in _ERROR_STATUSES
}


def _manager(request: Request) -> InstanceManager:
    manager: InstanceManager = request.app.state.manager
    return manager


def _tracker(request: Request) -> OperationTracker:
    tracker: OperationTracker = request.app.state.tracker
    return tracker


def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def _sleeper(request: Request) -> Sleeper:
    sleeper: Sleeper = request.app.state.sleeper
    return sleeper


Manager = Annotated[InstanceManager, Depends(_manager)]
SleeperDep = Annotated[Sleeper, Depends(_sleeper)]
Tracker = Annotated[OperationTracker, Depends(_tracker)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]

bearer = HTTPBearer(auto_error=False, description="the token in <data-root>/api-token")


def authorized(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    token: str = request.app.state.token
    if credentials is None or not secrets.compare_digest(
        credentials.credentials.encode(), token.encode()
    ):
        raise Unauthorized("missing or wrong bearer token")


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


# Every route but /healthz: authorised, and no unknown query parameter.
GUARDED = [Depends(authorized), Depends(known_query_only)]


def _operation_id(
    response: Response,
    x_torpor_operation: Annotated[
        str | None,
        Header(
            description="name this operation to poll its progress", pattern=OPERATION_ID_PATTERN
        ),
    ] = None,
) -> str:
    op_id = check_operation_id(x_torpor_operation)
    response.headers[OPERATION_HEADER] = op_id
    return op_id


OpId = Annotated[str, Depends(_operation_id)]
