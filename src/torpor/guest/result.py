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
