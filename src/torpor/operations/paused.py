"""The paused window: the one stretch of an operation in which the guest does not run.

Standby, a running VM's stored snapshot and (through it) fork pause the VM the same way:
the guest agent attached for the pause (a state saved with the agent's port connected is
answered at once after a restore), `stop` (the `pause` phase; none for a migration that
stops the VM itself, `stopped_by_migration`), the window timed (the `paused_window`
phase), and the VM resumed on every failure. It ends once, one of three ways:

- `release()`: resumed early, on purpose (a snapshot resumes once its state is saved and
  its disk frozen, while the disk copy goes on);
- `exited()`: QEMU quit with the state saved (standby): nothing to resume;
- the block ends: resumed if it was running when paused; on a failure, the error says what
  the failure left behind (resumed, could not be resumed, or QEMU died: crashed).

The caller's own clean-up for a failure (a partial state removed) runs inside the block,
before the VM is resumed; what must wait for the resume (a disk thaw) runs after it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator

from torpor.errors import OperationFailed, TorporError
from torpor.guest.agent import GuestAgent
from torpor.hypervisor.process import TrackedProcess
from torpor.hypervisor.qmp import Monitor, QmpError, StopEvents
from torpor.instances.context import InstanceContext
from torpor.instances.record import PhaseRecorder

log = logging.getLogger(__name__)


class PausedWindow:
    def __init__(self, ctx: InstanceContext, mon: Monitor, op: PhaseRecorder,
                 stopped_by_migration: bool = False) -> None:
        self.ctx, self.mon, self.op = ctx, mon, op
        self.stopped_by_migration = stopped_by_migration
        self.was_running = False
        self._paused_at: float | None = None
        self._opened_wall = 0.0  # time.time() at _paused_at: QEMU stamps STOP by the wall clock
        # Held for the pause only: the agent attached (qemu-ga takes one client at a
        # time), and QEMU's STOP events where the migration stops the VM.
        self._agent = contextlib.AsyncExitStack()
        self._stops: StopEvents | None = None

    @property
    def open(self) -> bool:
        return self._paused_at is not None

    async def _pause(self) -> None:
        await self._agent.enter_async_context(GuestAgent.attached(self.ctx.paths.agent_pipe))
        self.was_running = await self.mon.status() == "running"
        if self.stopped_by_migration:
            # The caller's migration stops the VM itself, once it has set up: the window
            # counts from QEMU's STOP event (its vCPUs paused), the guest ran until then.
            self._stops = self._agent.enter_context(self.mon.stop_events())
            self._paused_at, self._opened_wall = time.monotonic(), time.time()
            return
        self._paused_at = time.monotonic()
        with self.op.phase("pause"):
            await self.mon.pause()

    async def _close(self) -> None:
        if self._paused_at is not None:
            window = time.monotonic() - self._paused_at
            stopped = None if self._stops is None else self._stops.stopped_at()
            if stopped is not None:  # (never more than counted from before the migration)
                window = min(window, max(0.0, time.time() - stopped))
                # The guest ran this long into the migration before QEMU stopped it.
                self.op.add("ran_into_migration", max(0.0, stopped - self._opened_wall))
            self.op.add("paused_window", window)
            self._paused_at = None
        await self._agent.aclose()

    async def release(self) -> None:
        """End the pause now: the guest runs again (if it ran before)."""
        if self.open:
            if self.was_running:
                await self.mon.resume()  # failing, the window stays open: the block's
            await self._close()          # end reports it

    async def exited(self) -> None:
        """QEMU has quit (its state saved): the window ends with nothing to resume."""
        await self._close()


@contextlib.asynccontextmanager
async def paused_window(ctx: InstanceContext, mon: Monitor, process: TrackedProcess,
                        op: PhaseRecorder, what: str, *, stopped_by_migration: bool = False
                        ) -> AsyncIterator[PausedWindow]:
    """Pause the VM for the block (see the module's docstring). `what` names the
    operation in the error a failure raises ("standby of web"). `stopped_by_migration`:
    no `stop`; the block's first command is a migration that stops the VM itself (one
    with nothing to copy while it runs: memory-file mode's device state), and the window
    counts from QEMU's STOP event (from just before the migration if none came). A
    migration that fails has QEMU resume the VM itself."""
    window = PausedWindow(ctx, mon, op, stopped_by_migration)
    try:
        await window._pause()
        yield window
    except BaseException as exc:
        if not window.open:
            raise
        said = await _resume_after(window, process, what, exc)
        if said is exc:
            raise
        raise said from exc
    else:
        await window.release()
    finally:
        await window._agent.aclose()


async def _resume_after(window: PausedWindow, process: TrackedProcess, what: str,
                        error: BaseException) -> BaseException:
    """The VM back to how it was before the pause; the error to raise, saying so."""
    try:
        await window.release()
    except QmpError as resume_error:
        if not process.is_alive():
            return OperationFailed(f"{what} failed: QEMU died during the save ({error}) and"
                                   " the VM could not be resumed: the instance is crashed"
                                   " with its disk intact: start it again")
        log.error("%s failed (%s) and the VM could not be resumed: %s", what, error,
                  resume_error)
        return _said(error, what, f"the VM could not be resumed ({resume_error}): the next"
                                  " operation on it resumes it")
    return _said(error, what, "the VM was resumed" if window.was_running
                 else "the VM stays paused, as it was")


def _said(error: BaseException, what: str, outcome: str) -> BaseException:
    """`error` with what it left behind added to its message. A torpor error keeps its
    type (a snapshot's LegFailed still names its leg); anything else becomes an
    OperationFailed; a cancellation stays a cancellation."""
    if isinstance(error, TorporError):
        error.message = f"{error.message}; {outcome}"
        error.args = (error.message,)
        return error
    if not isinstance(error, Exception):
        return error
    return OperationFailed(f"{what} failed: {error}; {outcome}")
