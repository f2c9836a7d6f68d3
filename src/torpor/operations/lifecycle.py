"""Start and stop: launching QEMU for an instance and shutting it down again."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from torpor.errors import OperationFailed, TorporError
from torpor.fsutil import remove_tree
from torpor.guest.agent import AgentError, GuestAgent
from torpor.hypervisor.accel import resolve_accel
from torpor.hypervisor.process import LAUNCH_TIMEOUT, ProcessIdentity, TrackedProcess, launch
from torpor.hypervisor.qmp import Monitor, QmpError
from torpor.hypervisor.vmconfig import Accel, VMConfig
from torpor.images.imagedisk import GUEST_TOOLS_PATH
from torpor.instances.context import InstanceContext
from torpor.instances.metadata import InstanceState, utc_now
from torpor.instances.record import PhaseRecorder
from torpor.instances.runtime import (
    RuntimeRecord,
    clear_runtime,
    load_runtime,
    main_process_exited,
    save_runtime,
)
from torpor.instances.vmspec import vm_config_for
from torpor.jobs import compression as compression_jobs
from torpor.operations import network
from torpor.operations.guest_clock import ask_helper, cancel_helper, set_guest_clock
from torpor.paths import host_accel_cache
from torpor.tasks import in_thread, to_thread

log = logging.getLogger(__name__)
AGENT_ROUND = 1.0  # seconds of waiting for the agent between checks that QEMU still runs


def effective_accel(ctx: InstanceContext) -> Accel:
    image = ctx.meta.image
    choice = ctx.meta.accel if ctx.meta.accel != "auto" else ctx.settings.accel
    return resolve_accel(choice, kernel=image.kernel, initrd=image.initrd,
                         cache_file=ctx.data_root.accel_cache, host_cache=host_accel_cache,
                         binary=ctx.settings.qemu_binary)


def check_boot_files(ctx: InstanceContext) -> None:
    """What QEMU opens at start: said by name here, not in QEMU's words after a launch."""
    for f in (ctx.meta.image.kernel, ctx.meta.image.initrd):
        if f is not None and not f.exists():
            raise OperationFailed(f"boot file of instance {ctx.name} is missing: {f}")
    if not ctx.paths.disk.exists():
        raise OperationFailed(f"the disk of instance {ctx.name} is missing: {ctx.paths.disk}")


def spawn_qemu(ctx: InstanceContext, config: VMConfig, *, incoming: str | None = None,
               pass_fds: tuple[int, ...] = (),
               ready_timeout: float = LAUNCH_TIMEOUT) -> TrackedProcess:
    """Launch QEMU for this instance, recorded in runtime.json as soon as it has a pid (a
    QEMU that loads a large state takes a while to answer; it must not go unrecorded)."""
    def record(identity: ProcessIdentity, launched: VMConfig) -> None:
        save_runtime(ctx.paths, RuntimeRecord(identity=identity, vm_config=launched,
                                              launched_at=utc_now()))
    return launch_for(ctx, config, incoming=incoming, pass_fds=pass_fds,
                      ready_timeout=ready_timeout, on_started=record)[0]


def launch_for(ctx: InstanceContext, config: VMConfig, *, incoming: str | None,
               on_started: Callable[[ProcessIdentity, VMConfig], None],
               pass_fds: tuple[int, ...] = (), ready_timeout: float = LAUNCH_TIMEOUT
               ) -> tuple[TrackedProcess, VMConfig]:
    """QEMU for this instance (run/ cleared first), `on_started` told its identity and the
    config it runs as soon as it has a pid; the process and that config."""
    clear_runtime(ctx.paths)
    ctx.paths.logs_dir.mkdir(parents=True, exist_ok=True)
    # A bridged instance's TAP (kept across standby), the relay of published ports.
    launched = network.attach(ctx, config)
    try:
        process = launch(launched, pidfile=ctx.paths.pidfile, log_file=ctx.paths.qemu_log,
                         incoming=incoming, binary=ctx.settings.qemu_binary,
                         pass_fds=pass_fds, ready_timeout=ready_timeout,
                         on_started=lambda identity: on_started(identity, launched))
    except BaseException:
        clear_runtime(ctx.paths)  # launch leaves no QEMU behind when it fails
        raise
    return process, launched


async def spawn(ctx: InstanceContext, config: VMConfig, *, incoming: str | None = None,
                pass_fds: tuple[int, ...] = (),
                ready_timeout: float = LAUNCH_TIMEOUT) -> TrackedProcess:
    """spawn_qemu off the event loop: QEMU takes ~30 ms to initialise, and parallel
    restores (forks) must not queue behind each other. If we are cancelled meanwhile, the
    QEMU that did start is killed: no process outlives the operation."""
    return await in_thread(
        lambda _: spawn_qemu(ctx, config, incoming=incoming, pass_fds=pass_fds,
                             ready_timeout=ready_timeout),
        undo=lambda process: kill_and_forget(ctx, process))


async def agent_ready(ctx: InstanceContext, early: GuestAgent | None = None) -> GuestAgent:
    """A connection the agent has answered on (the caller closes it)."""
    return await GuestAgent.ready(ctx.paths.agent_pipe, ctx.settings.agent_timeout, early)


async def resume(ctx: InstanceContext) -> None:
    """paused → running. Recovery (operations/recover.py) has usually done it already when
    the lock was taken; a VM paused for another reason is resumed here."""
    if ctx.state is InstanceState.PAUSED:
        async with Monitor.connect(ctx.paths.qmp_socket) as mon:
            await mon.resume()


async def start(ctx: InstanceContext, *, wait_agent: bool = True) -> PhaseRecorder:
    """stopped/crashed → running. The caller holds the instance lock."""
    record = ctx.record
    if record is not None:  # crashed: make sure nothing of the old process remains
        await terminate(ctx, record.process())
    check_boot_files(ctx)
    discard_memory_file(ctx)  # a fresh boot starts from empty (sparse) RAM
    ctx.paths.exit_status.unlink(missing_ok=True)  # the last run's exit code is history
    if ctx.meta.memory_origin is not None:  # a fork booting afresh needs no origin's RAM
        ctx.meta.memory_origin = None
        await to_thread(ctx.meta.save, ctx.paths.metadata)
    op = PhaseRecorder("start", ctx.name)
    process: TrackedProcess | None = None
    try:
        with op.phase("spawn"):
            # The first start on a host probes KVM by booting the kernel (seconds): a
            # thread, so the daemon goes on serving meanwhile.
            accel = await to_thread(effective_accel, ctx)
            config = vm_config_for(ctx.meta, ctx.paths, accel)
            process = await spawn(ctx, config)
        if wait_agent:
            with op.phase("agent-ready"):
                agent = await _agent_unless_powered_off(ctx, process)
            if agent is not None:
                # The booted guest's clock is the emulated RTC's whole second (up to a
                # second off, either way): set from the host's, as a restore sets it.
                helper = ask_helper(config, ctx.settings.agent_timeout)
                try:
                    await set_guest_clock(agent, op, helper)
                    await _record_clock_source(ctx, agent)
                finally:
                    await cancel_helper(helper)
                    await agent.close()
            else:  # its command ran to its end: a stopped VM publishes nothing
                await to_thread(network.stop_publisher, ctx.paths)
    except BaseException as exc:
        if process is not None:
            await terminate(ctx, process)
        # A VM that did not start publishes nothing (the relay may be up already).
        await to_thread(network.stop_publisher, ctx.paths)
        await op.persist(ctx.paths, exc)
        raise
    await op.persist(ctx.paths)
    return op


async def _agent_unless_powered_off(ctx: InstanceContext,
                                    process: TrackedProcess) -> GuestAgent | None:
    """The agent once it answers; None if the VM powered off first because an image's
    main process ran to its end (that start did its job: the exit code is kept). A QEMU
    gone for any other reason is a failed start, said at once, not after the timeout.

    Waited for in rounds of at most a second with the process checked between them,
    not by cancelling a wait: on Python 3.11, `asyncio.wait_for` loses a cancellation
    that arrives as its inner connect fails (the socket gone with QEMU), and the wait
    then ran to its full timeout."""
    deadline = time.monotonic() + ctx.settings.agent_timeout
    while process.is_alive():
        try:
            return await GuestAgent.ready(ctx.paths.agent_pipe,
                                          min(AGENT_ROUND, deadline - time.monotonic()))
        except AgentError as exc:
            if time.monotonic() >= deadline:
                raise AgentError(f"guest agent did not answer within "
                                 f"{ctx.settings.agent_timeout:.0f} s ({exc})") from None
    record = load_runtime(ctx.paths)
    if record is not None and main_process_exited(ctx.paths, record):
        clear_runtime(ctx.paths)
        return None
    raise OperationFailed(f"QEMU exited while {ctx.name} booted (see {ctx.paths.qemu_log} "
                          f"and {ctx.paths.serial_log})")


CLOCK_SOURCE = "/sys/devices/system/clocksource/clocksource0/current_clocksource"


async def _record_clock_source(ctx: InstanceContext, agent: GuestAgent) -> None:
    """The guest kernel's clocksource, for the record (standby copies it into the
    manifest): whatever it is, a restored guest's wall clock is set from the host's."""
    try:
        source = (await agent.read_file(CLOCK_SOURCE)).decode(errors="replace").strip()
    except AgentError as exc:
        log.info("%s: clocksource not readable (%s)", ctx.name, exc)
        return
    if source != ctx.meta.guest_clock_source:
        ctx.meta.guest_clock_source = source
        await to_thread(ctx.meta.save, ctx.paths.metadata)


def discard_standby_state(ctx: InstanceContext) -> None:
    """standby → stopped: the saved state (and its job) go; the disk stays."""
    compression_jobs.cancel_and_wait(ctx.data_root,
                                     compression_jobs.instance_job_key(ctx.meta.id))
    remove_tree(ctx.paths.standby_dir)
    discard_memory_file(ctx)
    for path in compression_jobs.siblings(ctx.paths.memory_file)[0].values():
        path.unlink(missing_ok=True)
    if ctx.meta.compression_plan is not None:
        ctx.meta.compression_plan = None
        ctx.meta.save(ctx.paths.metadata)


def discard_memory_file(ctx: InstanceContext) -> None:
    """Drop the instance's own RAM file (never a fork's origin: that is a snapshot's)."""
    with contextlib.suppress(FileNotFoundError):
        ctx.paths.memory_file.unlink()


async def terminate(ctx: InstanceContext, process: TrackedProcess) -> None:
    """Kill the process if it is still ours and forget it."""
    await to_thread(kill_and_forget, ctx, process)


def kill_and_forget(ctx: InstanceContext, process: TrackedProcess) -> None:
    process.kill()
    clear_runtime(ctx.paths)


async def _ask_guest_to_power_off(ctx: InstanceContext) -> bool:
    """The built-in guest shuts down through the agent; an image's init is sent SIGTERM,
    which it forwards to the image's command, and powers off once that has exited."""
    try:
        async with GuestAgent.connect(ctx.paths.agent_pipe, timeout=2.0) as agent:
            if ctx.meta.image.kind == "oci":
                result = await agent.exec([f"{GUEST_TOOLS_PATH}/kill", "-TERM", "1"],
                                          timeout=5)
                return result.exit_code == 0
            await agent.shutdown()
            return True
    except AgentError as exc:
        log.info("%s: agent shutdown unavailable (%s)", ctx.name, exc)
        return False


async def shutdown(ctx: InstanceContext, process: TrackedProcess, timeout: float) -> str:
    """Graceful power-off through the agent, then QMP quit, then SIGKILL.
    Returns how the process ended."""
    if await _ask_guest_to_power_off(ctx) and await to_thread(
            process.wait_exit, timeout):
        return "guest powered off"
    with contextlib.suppress(QmpError):
        async with Monitor.connect(ctx.paths.qmp_socket, timeout=2.0) as mon:
            await mon.quit()
    if await to_thread(process.wait_exit, 3.0):
        return "QEMU quit"
    await to_thread(process.kill)
    return "killed"


async def stop(ctx: InstanceContext, *, timeout: float | None = None,
               force: bool = False) -> PhaseRecorder:
    """running/paused/crashed/unresponsive → stopped; with `force`, standby → stopped too (the saved
    state discarded). The caller holds the instance lock."""
    state, record = ctx.state, ctx.record
    op = PhaseRecorder("stop", ctx.name)
    await to_thread(network.stop_publisher, ctx.paths)  # a stopped VM publishes none
    if state is InstanceState.STANDBY:
        await to_thread(discard_standby_state, ctx)
        await op.persist(ctx.paths)
        return op
    try:
        assert record is not None
        process = record.process()
        with op.phase("shutdown"):
            if force or state in (InstanceState.CRASHED, InstanceState.UNRESPONSIVE):
                await to_thread(process.kill)  # nothing to ask it: it is gone or hung
            else:
                how = await shutdown(ctx, process, timeout or ctx.settings.stop_timeout)
                log.info("%s: %s", ctx.name, how)
        clear_runtime(ctx.paths)
        discard_memory_file(ctx)  # a stopped VM has no RAM: give the disk space back
    except TorporError as exc:
        await op.persist(ctx.paths, exc)
        raise
    await op.persist(ctx.paths)
    return op

