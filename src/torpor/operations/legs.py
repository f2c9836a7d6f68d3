"""Running the save leg and the copy leg of a snapshot at the same time.

TaskGroup semantics are wrong here: a failing copy must NOT cancel the save, because QEMU
is still writing into the snapshot directory; the operation waits for the save to end
before anyone cleans up. A failing save does cancel the copy (it observes cancellation
promptly). Either way both legs have ended when `run_legs` returns or raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from torpor.errors import OperationFailed

T = TypeVar("T")
U = TypeVar("U")


class LegFailed(OperationFailed):
    """Names the leg that failed; `error` is its exception."""

    def __init__(self, leg: str, error: BaseException, other: BaseException | None = None):
        detail = f"the {leg} leg failed: {error}"
        if other is not None:
            detail += f" (and the other leg too: {other})"
        super().__init__(detail)
        self.leg = leg
        self.error = error


async def run_legs(save: Coroutine[Any, Any, T], copy: Coroutine[Any, Any, U]) -> tuple[T, U]:
    save_task = asyncio.create_task(save, name="save-leg")
    copy_task = asyncio.create_task(copy, name="copy-leg")
    try:
        await asyncio.wait({save_task, copy_task}, return_when=asyncio.FIRST_EXCEPTION)
        save_error = save_task.exception() if save_task.done() else None
        if save_error is not None:
            copy_task.cancel()
            (copy_outcome,) = await asyncio.gather(copy_task, return_exceptions=True)
            raise LegFailed("save", save_error, _error_of(copy_outcome))
        copy_error = copy_task.exception() if copy_task.done() else None
        if copy_error is not None:
            # Never cancel the save: wait for it to end, whatever it does.
            (save_outcome,) = await asyncio.gather(save_task, return_exceptions=True)
            raise LegFailed("copy", copy_error, _error_of(save_outcome))
        return save_task.result(), copy_task.result()
    finally:
        # Only reached with a leg still running if we ourselves were cancelled.
        for task in (save_task, copy_task):
            if not task.done():
                task.cancel()
        await asyncio.gather(save_task, copy_task, return_exceptions=True)


def _error_of(outcome: object) -> BaseException | None:
    if isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
        return outcome
    return None


async def in_thread(work: Callable[[threading.Event], T]) -> T:
    """Run blocking `work(cancel_event)` in a thread; if this coroutine is cancelled, set the
    event and wait until the thread has really returned, so no thread outlives its leg."""
    stop = threading.Event()
    future = asyncio.ensure_future(asyncio.to_thread(work, stop))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(BaseException):
            await future
        raise
