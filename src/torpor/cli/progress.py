"""A progress bar for long operations, fed by the local observer or the daemon's
operation resource; shown only on a terminal.

In-process, the operation is a coroutine: it runs as a task and the bar is refreshed
from the same event loop. Through the daemon, the call is a blocking HTTP request: it
runs in a thread while the main thread polls the operation's progress.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from torpor.cli.output import err_console
from torpor.errors import Interrupted, TorporError

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from torpor.api.client import RemoteManager
    from torpor.instances.observe import StageProgress
    from torpor.manager import InstanceManager

T = TypeVar("T")
REFRESH = 0.2


@overload
def run(result: Coroutine[Any, Any, T]) -> T: ...


@overload
def run(result: T) -> T: ...


def run(result: Any) -> Any:
    """A backend call's result: the manager's calls are coroutines, run here (asyncio is
    imported only then); the daemon's client has already answered."""
    if isinstance(result, Coroutine):
        import asyncio

        try:
            return asyncio.run(result)  # a Ctrl-C cancels the operation: its cleanup runs
        except KeyboardInterrupt:  # (typer would make it exit 130 without a word)
            raise Interrupted("interrupted") from None
    return result


def with_progress(backend: InstanceManager | RemoteManager, label: str,
                  work: Callable[[], Coroutine[Any, Any, T] | T]) -> T:
    if not err_console.is_terminal:
        try:
            return run(work())  # through the daemon, work() is the blocking call itself
        except KeyboardInterrupt:
            raise Interrupted(DAEMON_FINISHES) from None
    if backend.remote:
        return _remote(cast("RemoteManager", backend), label, cast("Callable[[], T]", work))
    return run(_local(label, cast("Callable[[], Coroutine[Any, Any, T]]", work)))


class _Bars:
    """One bar per stage (save, load, copy), as the stages appear."""

    def __init__(self, label: str) -> None:
        from rich.progress import (  # a terminal only: rich.progress takes a while to load
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self.label = label
        self.progress: Progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeElapsedColumn(), console=err_console, transient=True)
        self.rows: dict[str, TaskID] = {}

    def update(self, stages: list[StageProgress]) -> None:
        for stage in stages:
            if stage.stage not in self.rows:
                self.rows[stage.stage] = self.progress.add_task(
                    f"{self.label}: {stage.stage}", total=stage.total_bytes)
            self.progress.update(self.rows[stage.stage], completed=stage.done_bytes,
                                 total=stage.total_bytes)


DAEMON_FINISHES = "interrupted: the daemon finishes the operation (`torpor list` shows it)"


def _remote(backend: RemoteManager, label: str, work: Callable[[], T]) -> T:
    op_id = backend.new_operation_id()
    backend.next_operation = op_id  # taken by the call, not by the polls
    outcome: list[Any] = []
    failure: list[BaseException] = []

    def call() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)

    # A daemon thread: interrupted, the CLI exits; the daemon finishes the operation.
    worker = threading.Thread(target=call, name="torpor-call", daemon=True)
    worker.start()
    bars = _Bars(label)
    try:
        with bars.progress:
            while worker.is_alive():
                worker.join(REFRESH)
                try:
                    bars.update(backend.operation(op_id).progress)
                except TorporError:  # not registered yet, or already forgotten
                    pass
    except KeyboardInterrupt:
        raise Interrupted(DAEMON_FINISHES) from None
    if failure:
        raise failure[0]
    return cast(T, outcome[0])


async def _local(label: str, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    import asyncio
    import contextlib

    from torpor.instances.observe import ProgressObserver, observing

    observer = ProgressObserver()
    with observing(observer):  # the task copies the context: it reports to `observer`
        task = asyncio.ensure_future(work())
    bars = _Bars(label)
    try:
        with bars.progress:
            while not task.done():
                await asyncio.wait({task}, timeout=REFRESH)
                bars.update(observer.stages())
        return task.result()
    finally:
        if not task.done():  # interrupted: the operation's own cleanup runs to the end
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
