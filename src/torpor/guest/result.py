"""What a command run in the guest left: kept apart from the agent's client so that the
daemon's HTTP client can hand it back without loading asyncio."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    truncated: bool = False  # the agent kept only the first OUTPUT_LIMIT of stdout or stderr


# What qemu-ga keeps of each of a command's stdout and stderr (GUEST_EXEC_MAX_OUTPUT).
OUTPUT_LIMIT = 16 << 20
