"""Recovery: an instance back in a state every command understands, after a torpor
process was killed in the middle of an operation on it.

Runs first in every locked operation (and in `torpor check --repair`, and when the daemon
starts). Holding the instance's lock means no operation is in flight on it, so whatever
an operation leaves only while it runs is debris here:

- QEMU paused (or mid-migration) with a complete `latest/`: a standby saved it or a
  restore loaded it, and the guest has not run since → QEMU quits: the instance is in
  standby.
- QEMU paused without `latest/`: a snapshot's (or a failed standby's) pause, or a restore
  that set its state aside before `cont` → QEMU is resumed (`cont` also re-activates the
  disks a completed save inactivated).
- QEMU running with a `latest/`: the VM has moved on from that state → it is removed.
- QEMU alive but its monitor does not answer: with a complete `latest/`, killed (as a
  paused one is quit: the guest has not run since the save); without, left alone (hung:
  its state is unresponsive, and `stop` kills it).
- a disk overlay: a snapshot froze the disk and did not fold it back → folded back, after
  the resume.
- `.latest.partial/`, `.latest.consumed/`: a standby cut short, a state a restore loaded
  → removed.
- no QEMU, its runtime record and a `latest/`: QEMU died or quit with its state saved →
  the record is cleared (standby).

A state is never loaded twice: a restore renames `latest/` aside before the guest runs.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from torpor.fsutil import remove_tree
from torpor.hypervisor.process import TrackedProcess
from torpor.hypervisor.qmp import PAUSED_STATES, Monitor, QmpError
from torpor.instances.context import InstanceContext
from torpor.instances.runtime import (
    QUERY_TIMEOUT,
    clear_runtime,
    has_standby_state,
    load_runtime,
)
from torpor.tasks import to_thread

log = logging.getLogger(__name__)
QUIT_TIMEOUT = 10.0


@dataclass
class Recovery:
    """What recovery did, one line each, and whether a live QEMU left alone did not
    answer its monitor (hung: the caller's state is unresponsive without asking again)."""

    done: list[str] = field(default_factory=list)
    qemu_silent: bool = False


async def recover(ctx: InstanceContext) -> Recovery:
    """Put the instance right (the caller holds its lock)."""
    record = load_runtime(ctx.paths)
    process = record.process() if record is not None else None
    if process is not None and process.is_alive():
        result = await _settle_live_qemu(ctx, process)
    else:
        result = Recovery()
        if record is not None and has_standby_state(ctx.paths):
            clear_runtime(ctx.paths)
            result.done.append("cleared the record of a QEMU that is gone (the state is saved)")
    done = result.done
    for leftover, what in ((ctx.paths.standby_partial_dir, "an interrupted standby's state"),
                           (ctx.paths.standby_consumed_dir, "a state a restore had loaded")):
        if leftover.exists():
            await to_thread(remove_tree, leftover)
            done.append(f"removed {what} ({leftover.name})")
    if ctx.paths.disk_overlay.exists():
        from torpor.operations.snapshots import fold_back_frozen_disk  # rare: loaded if needed

        if await fold_back_frozen_disk(ctx):
            done.append("folded back the disk overlay of an interrupted snapshot")
    for line in done:
        log.warning("instance %s: %s", ctx.name, line)
    return result


async def _settle_live_qemu(ctx: InstanceContext, process: TrackedProcess) -> Recovery:
    async with contextlib.AsyncExitStack() as stack:
        try:
            mon = await stack.enter_async_context(
                Monitor.connect(ctx.paths.qmp_socket, timeout=QUERY_TIMEOUT))
            status = await mon.status()
        except QmpError as exc:
            if has_standby_state(ctx.paths):
                # Standby's QEMU not yet gone, or a restore's still loading: the guest has
                # not run since the save, and a QEMU that answered would be quit here.
                from torpor.operations.lifecycle import terminate  # rare: loaded if needed

                await terminate(ctx, process)
                return Recovery([f"stopped a QEMU that does not answer beside its saved "
                                 f"state ({exc}): it is in standby"])
            # Hung (its state says unresponsive): nothing here can be asked of it, and
            # failing would keep every command, `stop` too, from freeing it.
            log.warning("instance %s: its QEMU does not answer its monitor: %s", ctx.name, exc)
            return Recovery(qemu_silent=True)
        if status == "running":
            if has_standby_state(ctx.paths):
                await to_thread(remove_tree, ctx.paths.standby_dir)
                return Recovery(["removed a saved state the running VM has moved on from"])
            return Recovery()
        if status not in PAUSED_STATES:
            return Recovery()  # crashed: stop or start deals with it
        if has_standby_state(ctx.paths):
            await _quit(ctx, mon)
            return Recovery([f"stopped a QEMU left {status} with its state saved: it is in "
                             "standby"])
        with contextlib.suppress(QmpError):  # a save cut short may still be "active"
            await mon.execute("migrate_cancel", timeout=5)
        await mon.resume()
        return Recovery([f"resumed a VM left {status} by an interrupted operation"])


async def _quit(ctx: InstanceContext, mon: Monitor) -> None:
    record = load_runtime(ctx.paths)
    await mon.quit()
    if record is not None:
        process = record.process()
        if not await to_thread(process.wait_exit, QUIT_TIMEOUT):
            await to_thread(process.kill)
    clear_runtime(ctx.paths)
