"""QEMU processes: launching them detached, and a process identity that makes sure
torpor never signals a process it did not start.

QEMU is launched with `-daemonize`: the launching call returns only once QEMU has
finished initialising (its monitor sockets listen), the QEMU process is never a child
of a torpor process (so it outlives the CLI, and no torpor process has zombies to reap),
and start-up errors come back as the launcher's exit status and stderr.
Waiting for exit uses a pidfd, never a poll of /proc.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from torpor.errors import OperationFailed
from torpor.hypervisor.vmconfig import VMConfig, render_argv
from torpor.paths import UNIX_PATH_MAX

LAUNCH_TIMEOUT = 30.0


def _read_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from /proc/<pid>/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


class ProcessIdentity(BaseModel):
    """A pid plus its start time: a pid alone may be reused by an unrelated process."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        stat = _read_stat(pid)
        return None if stat is None else cls(pid=pid, start_time=stat[1])

    def is_alive(self) -> bool:
        """True while the same process exists and has not exited (zombies count as gone)."""
        stat = _read_stat(self.pid)
        return stat is not None and stat[1] == self.start_time and stat[0] not in ("Z", "X")

    def open_pidfd(self) -> int | None:
        """A pidfd for exactly this process, or None if it is gone."""
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            return None
        # Checked after opening: from now on the fd cannot refer to a reused pid.
        stat = _read_stat(self.pid)
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


def _check_socket_paths(config: VMConfig) -> None:
    for sock in (config.qmp_socket, config.qmp_query_socket, config.agent_socket):
        if sock is not None and len(os.fsencode(sock)) > UNIX_PATH_MAX:
            raise OperationFailed(
                f"socket path too long for a unix socket ({len(str(sock))} > {UNIX_PATH_MAX}"
                f" bytes): {sock}; use a shorter data root"
            )


def launch(config: VMConfig, *, pidfile: Path, log_file: Path, incoming: bool = False,
           binary: str = "qemu-system-x86_64", extra_args: tuple[str, ...] = ()) -> TrackedProcess:
    """Start QEMU detached; returns once it has initialised, or raises with its error."""
    _check_socket_paths(config)
    for stale in (config.qmp_socket, config.qmp_query_socket, config.agent_socket, pidfile):
        if stale is not None:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    argv = [*render_argv(config, binary=binary, incoming=incoming), *extra_args,
            "-daemonize", "-pidfile", str(pidfile)]
    with open(log_file, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        try:
            launcher = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.PIPE, timeout=LAUNCH_TIMEOUT, check=False)
        except FileNotFoundError as exc:
            raise OperationFailed(f"QEMU binary not found: {binary}") from exc
        except subprocess.TimeoutExpired as exc:
            raise OperationFailed(
                f"QEMU did not finish starting in {LAUNCH_TIMEOUT:.0f} s") from exc
        log.write(launcher.stderr)
    if launcher.returncode != 0:
        message = launcher.stderr.decode(errors="replace").strip() or f"exit {launcher.returncode}"
        raise OperationFailed(f"QEMU failed to start: {message}")
    pid = int(pidfile.read_text().strip())
    identity = ProcessIdentity.of(pid)
    if identity is None:
        raise OperationFailed("QEMU exited right after starting; see " + str(log_file))
    return TrackedProcess(identity)


