"""DNS for bridged guests: one dnsmasq per bridge, answering on the bridge's address
only (the address guests' resolv.conf names) and forwarding to the host's resolvers, or
to `network.dns` when set. Guests cannot reach the host's own resolver (127.0.0.53 and
the like are the host's loopback), so something on the bridge must answer for them.

Why dnsmasq rather than a forwarder of our own: it is the kept tool for exactly this
(libvirt runs it per network too), caches, and drops its privileges to `nobody` after
binding. It daemonizes itself and reports a failed bind before its parent exits, so
`start` returns with it answering or raises. No DHCP: torpor hands out addresses itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from torpor.errors import OperationFailed

BINARY = "dnsmasq"


def argv(address: str, pid_file: Path, log_file: Path, upstream: list[str]) -> list[str]:
    servers = ["--no-resolv", *(f"--server={server}" for server in upstream)] if upstream \
        else []
    return [BINARY, "--conf-file=/dev/null", f"--pid-file={pid_file}",
            f"--listen-address={address}", "--bind-interfaces",
            # Never answer from the host's /etc/hosts (its names mean the host's own
            # loopback), never forward bare names or private reverse lookups upstream.
            "--no-hosts", "--domain-needed", "--bogus-priv",
            f"--log-facility={log_file}", *servers]


def pid(pid_file: Path) -> int | None:
    """The dnsmasq the pid file names, if it still runs (a zombie does not: dnsmasq is
    not our child, and PID 1 reaps it when it gets round to it)."""
    try:
        number = int(pid_file.read_text().strip())
        stat = Path(f"/proc/{number}/stat").read_text()
    except (OSError, ValueError):
        return None
    comm, _, rest = stat.partition("(")[2].rpartition(")")
    return number if comm == BINARY and rest.split()[0] != "Z" else None


def ensure(address: str, pid_file: Path, log_file: Path, upstream: list[str]) -> None:
    """dnsmasq answering on `address`, started unless it runs."""
    if pid(pid_file) is not None:
        return
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(argv(address, pid_file, log_file, upstream),
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise OperationFailed(f"starting DNS for bridged guests on {address} failed: "
                              + " ".join(result.stderr.split())[-300:])


def stop(pid_file: Path, timeout: float = 3.0) -> None:
    number = pid(pid_file)
    if number is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(number, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid(pid_file) == number and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid(pid_file) == number:
            with contextlib.suppress(ProcessLookupError):
                os.kill(number, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
