"""A progress bar for long operations, fed by the local observer or the daemon's
operation resource; shown only on a terminal."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, cast

from torpor.cli.output import err_console
from torpor.errors import TorporError
from torpor.instances.observe import ProgressObserver, StageProgress, observing

if TYPE_CHECKING:
    from torpor.api.client import RemoteManager
    from torpor.manager import InstanceManager

T = TypeVar("T")
REFRESH = 0.2

Stages = Callable[[], Awaitable[list[StageProgress]]]


async def with_progress(backend: InstanceManager | RemoteManager, label: str,
                        work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    if not err_console.is_terminal:
        return await work()
    if backend.remote:
        remote = cast("RemoteManager", backend)
        op_id = remote.new_operation_id()
        remote.next_operation = op_id

        async def remote_stages() -> list[StageProgress]:
            try:
                return (await remote.operation(op_id)).progress
            except TorporError:  # not registered yet, or already forgotten
                return []

        return await _render(label, asyncio.ensure_future(work()), remote_stages)
    observer = ProgressObserver()
    with observing(observer):  # the task copies the context: it reports to `observer`
        task = asyncio.ensure_future(work())

    async def local_stages() -> list[StageProgress]:
        return observer.stages()

    return await _render(label, task, local_stages)


async def _render(label: str, task: asyncio.Future[T], stages: Stages) -> T:
    # Imported here: only a terminal shows a bar, and rich.progress takes a while to load.
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=err_console, transient=True) as bar:
            rows: dict[str, TaskID] = {}
            while not task.done():
                await asyncio.wait({task}, timeout=REFRESH)
                for stage in await stages():
                    if stage.stage not in rows:
                        rows[stage.stage] = bar.add_task(f"{label}: {stage.stage}",
                                                         total=stage.total_bytes)
                    bar.update(rows[stage.stage], completed=stage.done_bytes,
                               total=stage.total_bytes)
        return task.result()
    finally:
        if not task.done():  # interrupted: the operation's own cleanup runs to the end
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
