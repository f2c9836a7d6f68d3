"""Structured concurrency, in one shape: no task or thread outlives the block that
started it.

- `task_group()`: asyncio.TaskGroup (a failing task cancels the others; leaving the
  block waits for all), with its error raised as itself rather than in an
  ExceptionGroup: torpor's errors carry the CLI's exit code and the API's error code,
  and callers catch them by type. The block's own error wins over a task's (it is the
  one that says what happened; the task's is usually its consequence); any other is
  logged.
- `to_thread(func, ...)`: `asyncio.to_thread`, always joined (below); every blocking
  call of torpor's goes through it or `in_thread`.
- `threads(calls, undo=...)`: several, all at once, joined the same way.
- `to_the_end(step)`: a coroutine that must not stop halfway, finished even when its
  caller is cancelled.
- `in_thread(work)`: blocking work in a thread, cancellable and always joined. `work`
  takes a threading.Event that asks it to stop; if the caller is cancelled, the event is
  set and the thread waited for (a thread cannot be killed: it must look at the event),
  and a result that arrived meanwhile is handed to `undo` (a QEMU that did start is
  killed).
- `Reaper`: what an operation no longer needs, removed after it returns, by a process
  that outlives it (the daemon), which waits for every removal before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from torpor import faults
from torpor.fsutil import set_aside

T = TypeVar("T")
P = ParamSpec("P")
log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    body_error: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as group:
            try:
                yield group
            except BaseException as exc:
                body_error = exc
                raise
    except BaseExceptionGroup as errors:
        leaves = list(_leaves(errors))
        first = body_error if body_error in leaves else leaves[0]
        for other in leaves:
            if other is not first:
                log.warning("also failed, alongside %r: %r", first, other)
        raise first from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


async def to_thread(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """`asyncio.to_thread`, joined: a cancelled caller waits for the call to end, then the
    cancellation goes on. A thread cannot be stopped, and one left running acts after its
    caller's cleanup: a Ctrl-C in standby's paused window discarded the saved state while
    the thread publishing it ran on (a state the resumed VM had moved on from)."""
    return await in_thread(lambda _: func(*args, **kwargs))


async def to_the_end(step: Awaitable[T], *,
                     undo: Callable[[T], Awaitable[object]] | None = None) -> T:
    """`step` run to its end even if the caller is cancelled meanwhile, and then the
    cancellation goes on, its result handed to `undo` first: a step that must not stop
    halfway (a disk overlay's fold-back), or whose result must not be lost (what a
    cancelled fork made, a tree set aside)."""
    task = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        try:
            result = await task
            if undo is not None:
                await undo(result)
        except Exception:
            log.exception("a step run to its end after a cancellation failed")
        raise


async def threads(calls: list[Callable[[], T]], *,
                  undo: Callable[[T], None]) -> list[T | BaseException]:
    """Each call in a thread of its own, all at once: their outcomes (a result or what it
    raised), in order. A cancelled caller waits for every call to end, hands each result
    to `undo` (what was made is unmade), then the cancellation goes on."""
    async def unmake(outcomes: list[T | BaseException]) -> None:
        for outcome in outcomes:
            if not isinstance(outcome, BaseException):
                await asyncio.to_thread(undo, outcome)

    everything = asyncio.gather(*(asyncio.to_thread(call) for call in calls),
                                return_exceptions=True)
    return await to_the_end(everything, undo=unmake)


async def in_thread(work: Callable[[threading.Event], T], *,
                    stop: threading.Event | None = None,
                    undo: Callable[[T], None] | None = None) -> T:
    """`work(stop)` in a thread (see the module's docstring). `stop` may be the caller's,
    to ask the thread to stop while still awaiting its outcome."""
    stop = stop or threading.Event()
    future = asyncio.ensure_future(asyncio.to_thread(work, stop))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(BaseException):
            result = await future
            if undo is not None:
                await asyncio.to_thread(undo, result)
        raise


class Reaper:
    """Removes directory trees an operation no longer needs. Each is renamed aside at
    once (fsutil.set_aside: gone from where it was, durably); while the reaper runs (the
    daemon's life) the rest of the removal happens on a thread of its own after the
    operation has returned, else before `remove` returns. Removing 1 GiB took ~0.25 s on
    this host's ext4: a wake's caller need not wait for it. Leaving `running` waits for
    every removal it started; a killed process leaves `.deleting-*` for `torpor check`."""

    def __init__(self) -> None:
        self._group: asyncio.TaskGroup | None = None
        self._pending: dict[Path, asyncio.Task[None]] = {}  # set-aside tree → its removal

    @property
    def active(self) -> bool:
        """Whether a removal ends after `remove` returns (inside `running`)."""
        return self._group is not None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with asyncio.TaskGroup() as group:
            self._group = group
            try:
                yield
            finally:
                self._group = None

    async def remove(self, path: Path) -> None:
        """`path` renamed aside, and removed: now, or (`active`) after the operation. A
        cancelled caller still waits for the rename and, outside `running`, the removal
        (one thread does both); inside, a tree set aside is handed over even then, so
        nothing is left set aside by a process that lives on (it was by a Ctrl-C)."""
        if self._group is None:
            await in_thread(lambda _: _set_aside_and_remove(path))
            return
        doomed = await to_the_end(asyncio.to_thread(set_aside, path), undo=self._hand_over)
        await self._hand_over(doomed)

    async def _hand_over(self, doomed: Path | None) -> None:  # (async: to_the_end's undo)
        if doomed is None or self._group is None:
            return
        removal = self._group.create_task(_remove_in_background(doomed))
        self._pending[doomed] = removal
        removal.add_done_callback(lambda _: self._pending.pop(doomed, None))

    async def settled(self, under: Path) -> None:
        """Until the removals of trees set aside below `under` have ended. An instance's
        next operation waits for what the last one left (a restore's state: ~0.25 s per
        GiB here), so it finds its disk space back and no removal competing with its
        paused window."""
        waiting = [task for doomed, task in self._pending.items()
                   if doomed.is_relative_to(under)]
        if waiting:
            await asyncio.wait(waiting)


def _remove(doomed: Path) -> None:
    faults.point("reaper.set-aside")
    shutil.rmtree(doomed, ignore_errors=True)


def _set_aside_and_remove(path: Path) -> None:
    doomed = set_aside(path)
    if doomed is not None:
        _remove(doomed)


async def _remove_in_background(doomed: Path) -> None:
    """Never raises: a task failing in the reaper's group would end the daemon's serving.
    What it could not remove stays set aside, for `torpor check` once we have exited."""
    try:
        await in_thread(lambda _: _remove(doomed))
    except Exception:
        log.exception("removing %s failed (`torpor check --repair` removes it once this "
                      "process has exited)", doomed)
