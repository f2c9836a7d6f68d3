"""Cross-process locks (flock) that serialise mutating operations on one instance.

flock locks belong to an open file description, so two tasks in one process conflict
just as two processes do. Acquisition polls LOCK_NB so it can time out and be cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from torpor.errors import Busy


@contextlib.asynccontextmanager
async def file_lock(path: Path, *, what: str, wait: float | None = None) -> AsyncIterator[None]:
    """Hold an exclusive lock on `path`. wait=None waits forever; 0 fails at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = None if wait is None else time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise Busy(f"{what} is busy with another operation") from None
                await asyncio.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing releases the lock
