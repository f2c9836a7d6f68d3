"""How torpor's errors map onto HTTP: a status and a `{code, message}` body."""

from __future__ import annotations

from torpor.errors import (
    AlreadyExists,
    Busy,
    IntegrityError,
    InvalidArgument,
    NotFound,
    TorporError,
    Unsupported,
    WrongState,
)


class Unauthorized(TorporError):
    code = "unauthorized"


class Timeout(TorporError):
    code = "timeout"


# Most specific first. OperationFailed (QEMU, the guest agent or the host failed while the
# operation ran) is not a bug of ours, so not 500: 502, as for a failing upstream.
_STATUS: tuple[tuple[type[TorporError], int], ...] = (
    (InvalidArgument, 400),
    (Unauthorized, 401),
    (Timeout, 408),
    (NotFound, 404),
    (WrongState, 409),
    (Busy, 409),
    (AlreadyExists, 409),
    (IntegrityError, 422),
    (Unsupported, 501),
)
OPERATION_FAILED_STATUS = 502


def http_status(error: TorporError) -> int:
    for kind, status in _STATUS:
        if isinstance(error, kind):
            return status
    return OPERATION_FAILED_STATUS
