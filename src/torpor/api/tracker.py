"""The daemon's operation resources: each long request is tracked while it runs.

A client may name its operation (header X-Torpor-Operation) and poll
GET /operations/{id} for its progress while the request is in flight; the request itself
returns the result. The last few hundred operations stay readable after they end.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Literal

from torpor.api.metrics import Metrics
from torpor.api.models import ErrorBody, Operation, OperationState
from torpor.errors import AlreadyExists, InvalidArgument, NotFound, TorporError
from torpor.instances.metadata import utc_now
from torpor.instances.observe import ProgressObserver, observing

Trigger = Literal["api", "idle", "traffic"]
OPERATION_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
KEEP_ENDED = 256


def error_body(error: BaseException) -> ErrorBody:
    if isinstance(error, TorporError):
        return ErrorBody(code=error.code, message=error.message)
    return ErrorBody(code="internal", message="internal error (see the daemon's log)")


def check_operation_id(value: str | None) -> str:
    if value is None:
        return secrets.token_hex(8)
    if not OPERATION_ID_RE.fullmatch(value):
        raise InvalidArgument("X-Torpor-Operation: 1-64 letters, digits, '_' or '-'")
    return value


class OperationTracker:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._ops: OrderedDict[str, tuple[Operation, ProgressObserver]] = OrderedDict()
        self._last_ended: dict[str, float] = {}  # instance → time.time() its last op ended

    @contextlib.asynccontextmanager
    async def track(self, op_id: str, kind: str, instance: str | None,
                    trigger: Trigger = "api") -> AsyncIterator[None]:
        """Run the body as operation `op_id`: its progress is observed, its end recorded."""
        if op_id in self._ops:
            raise AlreadyExists(f"operation {op_id} exists already")
        op = Operation(id=op_id, kind=kind, instance=instance, state=OperationState.RUNNING,
                       started_at=utc_now(), trigger=trigger)
        observer = ProgressObserver()
        self._ops[op_id] = (op, observer)
        self._forget_old()
        started = time.monotonic()
        result = "ok"
        self._metrics.in_progress.labels(kind).inc()
        try:
            with observing(observer):
                yield
        except BaseException as exc:
            op.error = error_body(exc)
            result = op.error.code
            raise
        finally:
            op.state = OperationState.FAILED if op.error else OperationState.SUCCEEDED
            op.finished_at = utc_now()
            if instance is not None:
                self._last_ended[instance] = time.time()
            self._metrics.in_progress.labels(kind).dec()
            self._metrics.operation_ended(kind, result, time.monotonic() - started, observer)

    def _forget_old(self) -> None:
        ended = [k for k, (op, _) in self._ops.items() if op.state is not OperationState.RUNNING]
        for key in ended[: max(0, len(ended) - KEEP_ENDED)]:
            del self._ops[key]

    def get(self, op_id: str) -> Operation:
        try:
            op, observer = self._ops[op_id]
        except KeyError:
            raise NotFound(f"no operation {op_id!r}") from None
        return op.model_copy(update={"progress": observer.stages(),
                                     "phases": dict(observer.phases)})

    def last_ended(self, instance: str) -> float:
        """When the last operation on `instance` ended (time.time(); 0: none yet)."""
        return self._last_ended.get(instance, 0.0)

    def running_on(self, instance: str) -> bool:
        """Whether an operation on `instance` is in flight now."""
        return any(op.instance == instance and op.state is OperationState.RUNNING
                   for op, _ in self._ops.values())

    def list(self, instance: str | None = None) -> list[Operation]:
        return [self.get(k) for k, (op, _) in self._ops.items()
                if instance in (None, op.instance)]

