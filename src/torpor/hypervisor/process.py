"""QEMU processes: launching them detached, and a process identity that makes sure
torpor never signals a process it did not start.

QEMU is launched through `setsid --fork`: the launching call returns only once QEMU has
finished initialising (its monitor answers a command), the QEMU process is never a child
of a torpor process (so it outlives the CLI, and no torpor process has zombies to reap),
and start-up errors come back from its output (in the log) when it exits.
Waiting for exit uses a pidfd, never a poll of /proc.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from torpor.errors import OperationFailed
from torpor.fsutil import process_alive, read_proc_stat
from torpor.hypervisor.vmconfig import VMConfig, chardev_fifos, render_argv
from torpor.paths import UNIX_PATH_MAX

LAUNCH_TIMEOUT = 30.0
LAUNCH_POLL = 0.001  # s between tries of a monitor that is not listening yet
# QEMU opens dozens of eventfds when the guest starts to run (`cont`: virtio's ioeventfds).
# Its file table growing past 64 entries then, with its threads running, waits out an RCU
# grace period: 10 ms of every restore's `cont`, measured. A descriptor QEMU inherits at
# this number sizes the table at exec, when growing it costs nothing.
FD_TABLE_SIZE = 256


class ProcessIdentity(BaseModel):
    """A pid plus its start time: a pid alone may be reused by an unrelated process."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        stat = read_proc_stat(pid)
        return None if stat is None else cls(pid=pid, start_time=stat[1])

    def is_alive(self) -> bool:
        """True while the same process exists and has not exited (zombies count as gone)."""
        return process_alive(self.pid, self.start_time)

    def open_pidfd(self) -> int | None:
        """A pidfd for exactly this process, or None if it is gone."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return None
        # Checked after opening: from now on the fd cannot refer to a reused pid.
        stat = read_proc_stat(self.pid)
        if stat is None or stat[1] != self.start_time:
            os.close(fd)
            return None
        return fd


@dataclass
class TrackedProcess:
    """A process torpor started (QEMU, a job worker), identified so that a reused pid is
    never signalled."""

    identity: ProcessIdentity

    @property
    def pid(self) -> int:
        return self.identity.pid

    def is_alive(self) -> bool:
        return self.identity.is_alive()

    @contextlib.contextmanager
    def held_pidfd(self) -> Iterator[int | None]:
        """A pidfd for this process, opened (and its identity checked) now, for a signal
        that must go out later without reading /proc (inside a paused window: that read
        took up to 4 ms here); None if the process is gone."""
        fd = self.identity.open_pidfd()
        try:
            yield fd
        finally:
            if fd is not None:
                os.close(fd)

    def signal(self, signum: int) -> bool:
        """Send a signal if the process is still ours; False if it is already gone."""
        fd = self.identity.open_pidfd()
        if fd is None:
            return False
        try:
            signal.pidfd_send_signal(fd, signum)
            return True
        except ProcessLookupError:
            return False
        finally:
            os.close(fd)

    def wait_exit(self, timeout: float) -> bool:
        """Block until the process has exited; False on timeout."""
        fd = self.identity.open_pidfd()
        if fd is None:
            return True
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(max(0.0, timeout) * 1000))
        finally:
            os.close(fd)

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL and wait until it is gone."""
        if self.signal(signal.SIGKILL) and not self.wait_exit(timeout):
            raise OperationFailed(f"QEMU process {self.pid} did not die after SIGKILL")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def vcpu_seconds(pid: int) -> float | None:
    """CPU time QEMU's vCPU threads have used (user + system), from /proc: the guest's
    own work, not QEMU's I/O threads. QEMU names them `CPU <n>/TCG` or `CPU <n>/KVM`
    (`-name ...,debug-threads=on`). None if the process is gone."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            if not (task / "comm").read_text().startswith("CPU "):
                continue
            raw = (task / "stat").read_text()
        except OSError:
            continue  # a thread that just ended
        fields = raw[raw.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def _check_socket_paths(config: VMConfig) -> None:
    for sock in (config.qmp_socket, config.qmp_query_socket, config.agent_socket):
        if sock is not None and len(os.fsencode(sock)) > UNIX_PATH_MAX:
            raise OperationFailed(
                f"socket path too long for a unix socket ({len(str(sock))} > {UNIX_PATH_MAX}"
                f" bytes): {sock}; use a shorter data root"
            )


@contextlib.contextmanager
def _fd_table_sizer() -> Iterator[int]:
    """/dev/null at descriptor FD_TABLE_SIZE - 1 or above, for QEMU to inherit."""
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        high = fcntl.fcntl(null, fcntl.F_DUPFD_CLOEXEC, FD_TABLE_SIZE - 1)
    finally:
        os.close(null)
    try:
        yield high
    finally:
        os.close(high)


def prepare_endpoints(config: VMConfig, pidfile: Path | None = None) -> None:
    """Before QEMU starts: the last run's sockets (and pidfile) gone, the FIFOs of the
    agent's and the identity helper's ports made (QEMU's `pipe` chardev opens them; it
    would not create them)."""
    fifos = chardev_fifos(config)
    for stale in (config.qmp_socket, config.qmp_query_socket, config.agent_socket, pidfile,
                  *fifos):
        if stale is not None:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    for fifo in fifos:
        os.mkfifo(fifo, 0o600)


def launch(config: VMConfig, *, pidfile: Path, log_file: Path, incoming: str | None = None,
           binary: str = "qemu-system-x86_64", extra_args: tuple[str, ...] = (),
           pass_fds: tuple[int, ...] = (), ready_timeout: float = LAUNCH_TIMEOUT,
           on_started: Callable[[ProcessIdentity], None] | None = None) -> TrackedProcess:
    """Start QEMU detached; returns once its monitor answers, or raises with its error.

    QEMU is started through `setsid --fork`, whose fork exits at once: QEMU is nobody's
    child here (the CLI may exit; no torpor process holds its zombie) and its stdout and
    stderr go to the log for its whole life. Not `-daemonize`: QEMU's own fork leaves the
    parent waiting while the child initialises, and every page the child writes meanwhile
    is copied: 35-45 ms to a ready monitor against about 30 ms, measured here.
    `pass_fds` are inherited under the same numbers (e.g. `-incoming fd:N`); `on_started`
    gets the process as soon as QEMU has written its pidfile, before it is ready (a QEMU
    that loads a state from its command line answers only once its loader yields)."""
    _check_socket_paths(config)
    if shutil.which(binary) is None:
        raise OperationFailed(f"QEMU binary not found: {binary}")
    prepare_endpoints(config, pidfile)
    argv = [*render_argv(config, binary=binary, incoming=incoming), *extra_args,
            "-pidfile", str(pidfile)]
    # QEMU holds the write end for its life: end of file on the read end means it exited.
    exited, holder = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            with open(log_file, "ab") as log, _fd_table_sizer() as sizer:
                log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n"
                          .encode())
                log.flush()
                output_from = log.tell()
                subprocess.run(["setsid", "--fork", *argv], stdin=subprocess.DEVNULL,
                               stdout=log, stderr=log, pass_fds=(sizer, holder, *pass_fds),
                               check=True)
        finally:
            os.close(holder)  # QEMU has its own copy
        waiting = _Startup(exited, pidfile, ready_timeout,
                           lambda: _output_since(log_file, output_from))
        identity = waiting.until_pidfile()
        try:
            if on_started is not None:
                on_started(identity)
            waiting.until_answering(config.qmp_socket)
        except BaseException:
            TrackedProcess(identity).kill()  # a failed launch leaves no QEMU behind
            raise
    finally:
        os.close(exited)
    return TrackedProcess(identity)


@dataclass
class _Startup:
    """Waiting for a launched QEMU: it exits (its output is the error), or the deadline
    passes (it is killed), or it gets there."""

    exited: int
    pidfile: Path
    timeout: float
    output: Callable[[], str]
    deadline: float = field(init=False)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    def until_pidfile(self) -> ProcessIdentity:
        """QEMU writes its pidfile early in its start-up."""
        while True:
            with contextlib.suppress(OSError, ValueError):
                identity = ProcessIdentity.of(int(self.pidfile.read_text().strip()))
                if identity is not None:
                    return identity
            if self._pause():
                raise OperationFailed(f"QEMU failed to start: {self._error()}")

    def until_answering(self, monitor: Path) -> None:
        """Until its monitor answers a command (its main loop runs: initialised)."""
        while not _answers(monitor, self.deadline):
            if self._pause():
                raise OperationFailed(f"QEMU failed to start: {self._error()}")

    def _pause(self) -> bool:
        """Wait LAUNCH_POLL; True if QEMU has exited. Past the deadline, raise (the caller
        kills it)."""
        if time.monotonic() >= self.deadline:
            raise OperationFailed(f"QEMU did not finish starting in {self.timeout:.0f} s")
        return bool(select.select([self.exited], [], [], LAUNCH_POLL)[0])

    def _error(self) -> str:
        return self.output() or "no message"


def _answers(monitor: Path, deadline: float) -> bool:
    """One QMP exchange: the greeting (the monitor's I/O thread sends it early), then
    qmp_capabilities, which the main loop answers once QEMU has initialised."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(monitor))
            sock.settimeout(max(0.0, deadline - time.monotonic()))
            reader = sock.makefile("rb")
            if not reader.readline():
                return False
            sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            return b'"return"' in reader.readline()
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, TimeoutError):
            return False


def _output_since(log_file: Path, offset: int) -> str:
    with open(log_file, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace").strip()


