"""The error types torpor raises for things a user can act on.

Every error a user can cause or fix derives from TorporError and carries an exit code
for the CLI and a stable `code` string for the API. Anything else is a bug.
"""

from __future__ import annotations


class TorporError(Exception):
    """Base class: a readable message, an exit code, a stable code string."""

    exit_code = 1
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(TorporError):
    exit_code = 2
    code = "invalid_argument"


class NotFound(TorporError):
    exit_code = 3
    code = "not_found"


class WrongState(TorporError):
    """The operation does not apply to the instance's current state."""

    exit_code = 4
    code = "wrong_state"


class Busy(TorporError):
    """Another operation holds the instance."""

    exit_code = 5
    code = "busy"


class AlreadyExists(TorporError):
    exit_code = 6
    code = "already_exists"


class Unsupported(TorporError):
    exit_code = 7
    code = "unsupported"


class OperationFailed(TorporError):
    """An operation ran and failed; the message says what state it left behind."""

    exit_code = 1
    code = "operation_failed"


class IntegrityError(OperationFailed):
    """Saved state does not match its manifest (checksum, version, config)."""

    code = "integrity_error"


class Interrupted(TorporError):
    """The user interrupted the command (Ctrl-C): the operation was cancelled and its own
    cleanup ran, so the instance is as `list` shows it."""

    exit_code = 130  # 128 + SIGINT, as a shell reports it
    code = "interrupted"
