"""The daemon's restore pool (setting `restore_pool`, $TORPOR_RESTORE_POOL; 0: off).

Up to N memory-file instances in standby get a QEMU started ahead of their restore
(operations/restore.prepare, operations/warm.py): a restore, or a wake on traffic,
claims it and skips QEMU's start, most of a memory-file restore's time. Why per
instance and not per VM shape: QEMU maps the RAM file when it creates the board, so a
QEMU cannot wait for just any instance of a shape (docs/design.md). The pool fills after
each standby the daemon runs and every TICK seconds (a standby by the CLI, a claimed
QEMU to replace); when the daemon stops, it kills what it started. Each waiting QEMU costs
its process (~24 MB of its own memory here, plus shared libraries), not the guest's RAM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from torpor.errors import TorporError
from torpor.instances.states import Action
from torpor.manager import InstanceManager
from torpor.operations import restore as restore_op
from torpor.operations import warm
from torpor.paths import InstancePaths
from torpor.tasks import to_thread

log = logging.getLogger(__name__)
TICK = 5.0


class RestorePool:
    def __init__(self, manager: InstanceManager) -> None:
        self._manager = manager
        self._size = manager.settings.restore_pool
        self._poke = asyncio.Event()

    def _memory_file_instances(self) -> list[tuple[str, InstancePaths]]:
        """(name, paths) of the instances that can have a waiting QEMU."""
        root = self._manager.data_root
        return [(meta.name, root.instance(meta.id))
                for meta in self._manager.registry.all_metadata()
                if meta.memory_backing == "file"]

    def waiting(self) -> int:
        """QEMUs of this daemon waiting for a restore now (a metric, read at scrape)."""
        return sum(1 for _, paths in self._memory_file_instances()
                   if warm.owned_alive(paths) is not None)

    def poke(self) -> None:
        """An instance went into standby: fill now rather than at the next tick."""
        self._poke.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        if self._size <= 0:
            yield
            return
        stop = asyncio.Event()
        self._manager.after_standby = self.poke
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._fill_loop(stop))
                try:
                    yield
                finally:
                    stop.set()
                    self._poke.set()
        finally:
            self._manager.after_standby = None
            await self._discard_all()

    async def _fill_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._poke.clear()
            try:
                await self._fill(stop)
            except Exception:
                log.exception("filling the restore pool failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):  # not wait_for: see hypervisor/qmp.py
                    await self._poke.wait()

    async def _fill(self, stop: asyncio.Event) -> None:
        waiting, candidates = await to_thread(self._candidates)
        for name, stale in candidates:
            if waiting >= self._size or stop.is_set():
                return
            try:  # never waits: an instance someone is working on is filled next time
                async with self._manager.registry.locked_in_background(
                        name, Action.PREPARE_RESTORE) as ctx:
                    if stale:  # its RAM file was replaced (compressed): it holds the old
                        await to_thread(warm.discard, ctx.paths)
                    waiting += await restore_op.prepare(ctx)
            except TorporError as exc:
                log.info("restore pool: %s: %s", name, exc)

    def _candidates(self) -> tuple[int, list[tuple[str, bool]]]:
        """(QEMUs waiting now, [(instance, has a stale one)] for the memory-file standbys
        that could have a waiting QEMU and have none, or one that is dead or maps a
        replaced RAM file)."""
        waiting, found = 0, []
        for name, paths in self._memory_file_instances():
            if restore_op.waitable_state(paths) is None:
                continue
            record = warm.load(paths)
            if record is None:
                found.append((name, False))
            elif warm.maps_current_memory(record) and warm.owned_alive(paths) is not None:
                waiting += 1
            else:  # dead, or mapping a replaced RAM file: discarded, then started again
                found.append((name, True))
        return waiting, found

    async def _discard_all(self) -> None:
        """The daemon stops: kill every waiting QEMU it started (under each instance's
        lock, not waiting: a restore holding it is claiming that QEMU)."""
        for name, paths in await to_thread(self._memory_file_instances):
            if warm.owned_alive(paths) is None:
                continue
            with contextlib.suppress(TorporError):
                async with self._manager.registry.locked_in_background(
                        name, Action.PREPARE_RESTORE) as ctx:
                    await to_thread(warm.discard, ctx.paths)
