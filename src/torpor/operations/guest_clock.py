"""The guest's wall clock set from the host's, as a VM starts or resumes.

A resumed guest's clock continued from the moment it was paused; a booted guest's is
the emulated RTC's, read in whole seconds (up to a second either way). Both are set by
the guest's identity helper (guest/identity.py: a system call, no process started) or
else by qemu-ga's `guest-set-time` (which forks hwclock in the guest). How far behind the
guest was goes into the operation's record as `clock_behind`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from torpor.guest import identity as guest_identity
from torpor.guest.agent import AgentError, GuestAgent
from torpor.guest.identity import Applied, Identity, IdentityError
from torpor.hypervisor.vmconfig import VMConfig
from torpor.instances.record import PhaseRecorder

log = logging.getLogger(__name__)
# How long the guest's identity helper may stay silent once the agent has answered (it
# answers first, in ms, when it runs at all).
HELPER_GRACE = 2.0


def ask_helper(config: VMConfig, timeout: float, identity: Identity | None = None
               ) -> asyncio.Future[Applied] | None:
    """The clock (and `identity`) asked of the guest's helper now, answered while the
    caller waits for the agent; None if the VM has no helper port. The caller owns the
    future: `set_guest_clock` awaits it, or the caller cancels it."""
    pipe = config.identity_pipe
    if pipe is None:
        return None
    return asyncio.ensure_future(guest_identity.apply(pipe, identity=identity,
                                                      timeout=timeout))


async def set_guest_clock(agent: GuestAgent, op: PhaseRecorder,
                          helper: asyncio.Future[Applied] | None = None) -> bool:
    """Set the guest's wall clock from the host's, by the guest's identity helper
    (`helper`, asked already) or else `guest-set-time`. True if the helper did it (and
    the identity it was given). A guest whose clock cannot be set keeps running, with a
    warning in the log."""
    if helper is not None:
        with op.phase("identity"):
            applied = await _helper_result(helper, op.instance)
        if applied is not None:
            op.add("clock_behind", (applied.sent_time_ns - applied.guest_time_ns) / 1e9)
            return True
    with op.phase("clock"):
        try:
            behind = time.time_ns() - await agent.get_time()
            await agent.set_time(time.time_ns())
        except AgentError as exc:
            log.warning("%s: the guest's clock was not set: %s", op.instance, exc)
            return False
    op.add("clock_behind", behind / 1e9)
    return False


async def cancel_helper(helper: asyncio.Future[Applied] | None) -> None:
    """A helper's request given up (the operation failed before its answer was read)."""
    if helper is not None and not helper.done():
        helper.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await helper


async def _helper_result(helper: asyncio.Future[Applied], instance: str) -> Applied | None:
    """The helper's answer; None (logged) if it refused, or is still silent HELPER_GRACE
    after the agent answered (a guest whose helper died or hangs: the agent does it)."""
    await asyncio.wait({helper}, timeout=HELPER_GRACE)
    if not helper.done():
        await cancel_helper(helper)
        log.warning("%s: the guest's identity helper did not answer; the agent sets the "
                    "clock", instance)
        return None
    try:
        return helper.result()
    except IdentityError as exc:
        log.warning("%s: %s; the agent sets the clock", instance, exc)
        return None
