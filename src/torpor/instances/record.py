"""Recording an operation's phases and result into the instance's metadata."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from torpor.instances import observe
from torpor.instances.metadata import InstanceMetadata, LastOperation, utc_now
from torpor.paths import InstancePaths
from torpor.tasks import to_thread

log = logging.getLogger("torpor.operations")


class PhaseRecorder:
    """Times named phases; `record()` persists them as the instance's last operation."""

    def __init__(self, kind: str, instance: str,
                 on_phase: Callable[[str, float], None] | None = None) -> None:
        self.kind = kind
        self.instance = instance
        self.started_at = utc_now()
        self.phases: dict[str, float] = {}
        self._on_phase = on_phase

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        log.info("%s %s: %s ...", self.kind, self.instance, name)
        try:
            yield
        finally:
            elapsed = time.monotonic() - start
            self.phases[name] = round(elapsed, 6)
            observe.phase(name, elapsed)
            log.info("%s %s: %s took %.3f s", self.kind, self.instance, name, elapsed)
            if self._on_phase is not None:
                self._on_phase(name, elapsed)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = round(seconds, 6)
        observe.phase(name, seconds)

    def as_last_operation(self, error: BaseException | None) -> LastOperation:
        return LastOperation(kind=self.kind, result="error" if error else "ok",
                             started_at=self.started_at, phases=dict(self.phases),
                             error=str(error) if error else None)

    async def persist(self, paths: InstancePaths, error: BaseException | None = None) -> None:
        """`record` in a thread: its fsync (tens of ms when other copies are flushing) must
        not hold up the other operations of this process (parallel forks, the daemon)."""
        await to_thread(self.record, paths, error)

    def record(self, paths: InstancePaths, error: BaseException | None = None) -> None:
        """Persist into metadata.json; silently skipped if the instance is gone."""
        try:
            meta = InstanceMetadata.load(paths.metadata)
        except FileNotFoundError:
            return
        meta.last_operation = self.as_last_operation(error)
        meta.save(paths.metadata)
