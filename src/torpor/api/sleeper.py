"""The daemon's idle clock and waker: instances with an auto-standby policy go into
standby once idle that long, and a connection to a sleeping instance's published port
wakes it (the relay asks, `wake` here restores: one restore however many connections
wait, since concurrent wakes of one instance share one task).

Idle means, for the whole policy time: running; no operation on it in flight or ended
(`operations` and exec/console calls, which `busy` marks); no connection open or held on
its published ports (the relay's activity file); no hold; its vCPUs below
`auto_standby_cpu` of their time at every round (QEMU's vCPU threads in /proc: an idle
TCG guest uses ~5 % of one, a busy loop 100 %; a CI job talking only outward would
otherwise be put to sleep mid-run). The clock restarts at each
start or restore (the QEMU's launch time). Every task here belongs to the TaskGroup of
`running`, which the app's lifespan enters: none outlives the daemon.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator

from torpor.api.metrics import Metrics
from torpor.api.tracker import OperationTracker
from torpor.errors import Busy, OperationFailed, TorporError, WrongState
from torpor.hypervisor.process import vcpu_seconds
from torpor.instances.hold import hold_end
from torpor.instances.metadata import InstanceMetadata, InstanceState
from torpor.instances.runtime import derive_state
from torpor.manager import InstanceManager
from torpor.network.activity import read_activity
from torpor.operations.registry import effective_auto_standby
from torpor.paths import InstancePaths
from torpor.tasks import to_thread

log = logging.getLogger("torpor.sleeper")
TICK = 1.0  # how often the idle clock looks (a policy is at least this coarse)
WAKE_LOCK_WAIT = 120.0  # a wake waits this long for an operation on the instance to end


class Sleeper:
    def __init__(self, manager: InstanceManager, tracker: OperationTracker,
                 metrics: Metrics) -> None:
        self._manager = manager
        self._tracker = tracker
        self._metrics = metrics
        self._group: asyncio.TaskGroup | None = None
        self._wakes: dict[str, asyncio.Task[bool | TorporError]] = {}
        self._sleeping: set[str] = set()  # auto-standbys under way
        self._busy: collections.Counter[str] = collections.Counter()
        self._last_call: dict[str, float] = {}  # name → time.time() a call on it ended
        self._cpu: dict[str, tuple[int, float, float]] = {}  # name → (pid, time, vCPU s)
        self._last_busy: dict[str, float] = {}  # name → time.time() its vCPUs were busy

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The idle clock runs, and wakes can be asked for, while this is entered."""
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            self._group = group
            group.create_task(self._clock(stop))
            try:
                yield
            finally:
                stop.set()
                self._group = None

    @contextlib.asynccontextmanager
    async def busy(self, name: str) -> AsyncIterator[None]:
        """A call on the instance (exec, console) is in flight: it is not idle."""
        self._busy[name] += 1
        try:
            yield
        finally:
            self._busy[name] -= 1
            self._last_call[name] = time.time()

    # --- wake on traffic -----------------------------------------------------------------

    async def wake(self, name: str) -> bool:
        """Restore `name` if it is in standby; True if this wake did. Concurrent wakes of
        one instance join the first."""
        task = self._wakes.get(name)
        if task is None:
            if self._group is None:
                raise OperationFailed("the daemon is shutting down")
            task = self._group.create_task(self._wake(name))
            self._wakes[name] = task
            task.add_done_callback(lambda _: self._wakes.pop(name, None))
        result = await asyncio.shield(task)
        if isinstance(result, TorporError):
            raise result
        return result

    async def _wake(self, name: str) -> bool | TorporError:
        """Never raises (a failure in a TaskGroup's task would cancel the daemon's other
        tasks): the error is returned to whoever waits, and recorded by the operation."""
        try:
            info = await self._manager.get(name)
            if info.state is InstanceState.RUNNING and not (
                    InstancePaths(info.path).standby_dir.exists()):
                return False  # awake, and no standby under way: nothing to record
            # (A standby under way shows as running until it pauses: the wake then waits
            # for it to end, under the instance's lock, and restores.)
            async with self._tracker.track(secrets.token_hex(8), "restore", name,
                                           trigger="traffic"):
                return await self._manager.wake(name, wait=WAKE_LOCK_WAIT)
        except TorporError as exc:
            return exc
        except Exception as exc:
            log.exception("waking %s failed", name)
            return OperationFailed(f"waking {name} failed: {exc}")

    def record_wake(self, name: str, ok: bool, seconds: float, error: str | None) -> None:
        """A relay's account of one wake: accept to connected, or why it failed."""
        self._metrics.wakes.labels("ok" if ok else "error").inc()
        if ok:
            self._metrics.wake_seconds.observe(seconds)
        else:
            log.warning("wake of %s on traffic failed after %.3f s: %s", name, seconds, error)

    # --- the idle clock ------------------------------------------------------------------

    async def _clock(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._tick()
            except Exception:
                log.exception("the idle clock's round failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):  # not wait_for: see hypervisor/qmp.py
                    await stop.wait()

    async def _tick(self) -> None:
        metas = await to_thread(self._manager.registry.all_metadata)
        for meta in metas:
            policy = effective_auto_standby(meta, self._manager.settings)
            if policy <= 0 or meta.name in self._sleeping or meta.name in self._wakes:
                continue
            idle = await self.idle_for(meta)
            if idle is not None and idle >= policy and self._group is not None:
                self._sleeping.add(meta.name)
                self._group.create_task(self._auto_standby(meta.name))

    async def idle_for(self, meta: InstanceMetadata) -> float | None:
        """Seconds the running instance has been idle; None if it is busy now (or not
        running)."""
        name = meta.name
        if self._busy[name] or self._tracker.running_on(name):
            return None
        paths = self._manager.data_root.instance(meta.id)
        state, record = await derive_state(paths)
        if state is not InstanceState.RUNNING or record is None:
            return None
        activity = read_activity(paths.publisher_activity)
        if activity.busy:
            return None
        now = time.time()
        if not self._sample_cpu(meta, record.identity.pid, now):
            return None  # its first round: the vCPU share is known from the next
        held = hold_end(paths)
        if held is not None and held.timestamp() > now:
            return None
        last = max(record.launched_at.timestamp(), activity.changed,
                   self._last_call.get(name, 0.0), self._tracker.last_ended(name),
                   held.timestamp() if held else 0.0, self._last_busy.get(name, 0.0))
        return now - last

    def _sample_cpu(self, meta: InstanceMetadata, pid: int, now: float) -> bool:
        """The guest's vCPU share since the last round; above the bar, it counts as
        activity now (a batch job with no connection is not idle). False while there is
        no share to judge (the first round of this QEMU)."""
        used = vcpu_seconds(pid)
        if used is None:
            return False
        previous = self._cpu.get(meta.name)
        self._cpu[meta.name] = (pid, now, used)
        if previous is None or previous[0] != pid or now <= previous[1]:
            return False
        share = (used - previous[2]) / (now - previous[1]) / max(meta.cpus, 1)
        if share > self._manager.settings.auto_standby_cpu:
            self._last_busy[meta.name] = now
        return True

    async def _auto_standby(self, name: str) -> None:
        try:
            async with self._tracker.track(secrets.token_hex(8), "standby", name,
                                           trigger="idle"):
                await self._manager.standby(name)
            self._metrics.auto_standby.inc()
        except (WrongState, Busy):
            pass  # it changed meanwhile, or an operation holds it: the clock looks again
        except TorporError as exc:
            log.warning("auto-standby of %s failed: %s", name, exc)
        except Exception:
            log.exception("auto-standby of %s failed", name)
        finally:
            self._sleeping.discard(name)
