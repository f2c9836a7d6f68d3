"""Watching an operation while it runs: byte progress per stage, phase timings, copies.

Whoever runs an operation and wants to watch it (the CLI's progress bar, the daemon's
operation resources and metrics) installs an `ProgressObserver` with `observing()`; the
operation reports into whatever observer is current. The observer travels with the
context: into the tasks the operation starts and into `asyncio.to_thread` workers.
Nothing is reported when no observer is installed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from pydantic import BaseModel

from torpor.copy import CopyReport

Progress = Callable[[int], None]


class StageProgress(BaseModel):
    """Bytes done in one stage (save, load, copy) and the expected total, if known."""

    stage: str
    done_bytes: int = 0
    total_bytes: int | None = None


class ProgressObserver:
    """Thread-safe: copy legs report from worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stages: dict[str, StageProgress] = {}
        self.phases: dict[str, float] = {}
        self.copies: list[CopyReport] = []

    def counter(self, stage: str, total: int | None = None) -> Progress:
        """A callback adding bytes to `stage`; totals of repeated stages add up."""
        with self._lock:
            current = self._stages.setdefault(stage, StageProgress(stage=stage))
            if total is not None:
                current.total_bytes = (current.total_bytes or 0) + total

        def advance(nbytes: int) -> None:
            with self._lock:
                current.done_bytes += nbytes

        return advance

    def phase(self, name: str, seconds: float) -> None:
        with self._lock:
            self.phases[name] = round(seconds, 6)

    def copied(self, report: CopyReport) -> None:
        with self._lock:
            self.copies.append(report)

    def stages(self) -> list[StageProgress]:
        with self._lock:
            return [s.model_copy() for s in self._stages.values()]


_current: ContextVar[ProgressObserver | None] = ContextVar("torpor_observer", default=None)


@contextlib.contextmanager
def observing(observer: ProgressObserver) -> Iterator[ProgressObserver]:
    token = _current.set(observer)
    try:
        yield observer
    finally:
        _current.reset(token)


def counter(stage: str, total: int | None = None) -> Progress | None:
    observer = _current.get()
    return observer.counter(stage, total) if observer is not None else None


def phase(name: str, seconds: float) -> None:
    observer = _current.get()
    if observer is not None:
        observer.phase(name, seconds)


def copied(report: CopyReport) -> CopyReport:
    observer = _current.get()
    if observer is not None:
        observer.copied(report)
    return report


def current() -> ProgressObserver | None:
    return _current.get()
