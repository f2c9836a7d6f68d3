"""Bridged networking for instances: an address from the data root's pool at create and
fork, the bridge and the instance's TAP before each QEMU start (they outlive QEMU across
standby), both released at delete. `network/` does the host side; this module decides
whose address and TAP they are."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys

from torpor.errors import Busy, InvalidArgument
from torpor.fsutil import read_json
from torpor.hypervisor.process import ProcessIdentity, TrackedProcess
from torpor.hypervisor.vmconfig import PortForward
from torpor.instances.context import InstanceContext, Settings
from torpor.instances.metadata import InstanceMetadata, NetworkMode, NetworkSpec, tap_name
from torpor.network import firewall, host
from torpor.network.addresses import AddressPool
from torpor.paths import DataRoot, InstancePaths

MODES = ("user", "bridge", "none")


def pool(data_root: DataRoot, settings: Settings) -> AddressPool:
    return AddressPool(settings.network_subnet, data_root.network_leases,
                       data_root.network_lock)


def assign(data_root: DataRoot, settings: Settings, instance_id: str,
           mode: NetworkMode | None) -> NetworkSpec:
    """A new instance's network (`mode` None: the configured default); a bridged one
    gets its own address (the caller releases it if the instance is not published)."""
    mode = mode or settings.network_default
    if mode not in MODES:
        raise InvalidArgument(f"--network must be one of {', '.join(MODES)}, not {mode!r}")
    if mode != "bridge":
        return NetworkSpec(mode=mode)
    lease = pool(data_root, settings).allocate(instance_id)
    return NetworkSpec(mode="bridge", ip=lease.address, prefix=lease.prefix,
                       gateway=lease.gateway, bridge=settings.network_bridge)


def attach(ctx: InstanceContext) -> None:
    """Before a QEMU of a bridged instance starts: the bridge and its TAP exist."""
    spec = ctx.meta.network
    if spec.mode != "bridge":
        return
    bridge = spec.bridge or ctx.settings.network_bridge
    host.ensure_bridge(bridge, spec.gateway or "", spec.prefix or 24)
    firewall.apply(bridge, ctx.settings.network_subnet, nat=ctx.settings.network_nat)
    host.ensure_tap(tap_name(ctx.meta.id), bridge)
    start_publisher(ctx)


def start_publisher(ctx: InstanceContext) -> None:
    """The relay of a bridged instance's published ports, unless it runs. The ports are
    bound here, so one in use fails this start at once; the relay is handed the sockets
    and the lock (inherited descriptors) and outlives QEMU across standby."""
    forwards, spec = ctx.meta.port_forwards, ctx.meta.network
    if spec.mode != "bridge" or not forwards:
        return
    paths = ctx.paths
    paths.publish_dir.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(paths.publisher_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    sockets: list[socket.socket] = []
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # it runs
        for forward in forwards:
            sockets.append(_bind(forward.host_addr, forward.host_port))
        argv = [sys.executable, "-m", "torpor.network.publisher", "--lock-fd", str(lock_fd),
                "--identity", str(paths.publisher_identity)]
        for sock, forward in zip(sockets, forwards, strict=True):
            argv += ["--listen", f"{sock.fileno()}={spec.ip}:{forward.guest_port}"]
        paths.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(paths.publisher_log, "ab") as log:
            # Detached (setsid -f): no child of ours to reap, and it outlives this process.
            subprocess.run(["setsid", "-f", *argv], stdin=subprocess.DEVNULL, stdout=log,
                           stderr=log, check=True,
                           pass_fds=(lock_fd, *(s.fileno() for s in sockets)))
    finally:
        for sock in sockets:
            sock.close()
        os.close(lock_fd)


def _bind(host_addr: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host_addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host_addr, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise Busy(f"cannot publish {host_addr}:{port}: {exc.strerror}") from None
    return sock


def stop_publisher(paths: InstancePaths, timeout: float = 5.0) -> None:
    """The relay stopped (SIGTERM, then SIGKILL), its ports free again."""
    try:
        identity = ProcessIdentity.model_validate(read_json(paths.publisher_identity))
    except (OSError, ValueError):
        return
    process = TrackedProcess(identity)
    process.signal(signal.SIGTERM)
    if not process.wait_exit(timeout):
        process.kill()
    paths.publisher_identity.unlink(missing_ok=True)


_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_PORT = r"(?:6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3})"
# [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp], IPv4; the API's schema states the same pattern.
PUBLISH_PATTERN = (rf"^(?:({_OCTET}(?:\.{_OCTET}){{3}}):)?({_PORT}):"
                   rf"({_PORT})(?:/(tcp))?$")
PUBLISH_RE = re.compile(PUBLISH_PATTERN)


def parse_publish(text: str) -> PortForward:
    """[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp]; the host address defaults to 127.0.0.1
    (give 0.0.0.0 to publish on every address)."""
    match = PUBLISH_RE.fullmatch(text.strip())
    if match is None:
        raise InvalidArgument(f"--publish {text!r}: use [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp]")
    host_ip = match[1] or "127.0.0.1"
    try:
        ipaddress.ip_address(host_ip)
        return PortForward(host_addr=host_ip, host_port=int(match[2]),
                           guest_port=int(match[3]))
    except ValueError as exc:
        raise InvalidArgument(f"--publish {text!r}: {str(exc).splitlines()[0]}") from None


def check_publishable(forwards: list[PortForward], others: list[InstanceMetadata]) -> None:
    """At create: each host port free now and not another instance's."""
    for forward in forwards:
        for meta in others:
            if any((f.host_addr, f.host_port) == (forward.host_addr, forward.host_port)
                   for f in meta.port_forwards):
                raise Busy(f"{forward.host_addr}:{forward.host_port} is published by "
                           f"instance {meta.name}")
        _bind(forward.host_addr, forward.host_port).close()


def release(data_root: DataRoot, settings: Settings, meta: InstanceMetadata) -> None:
    """A deleted instance's address and TAP go (idempotent)."""
    if meta.network.mode == "bridge":
        stop_publisher(data_root.instance(meta.id))
        release_owner(data_root, settings, meta.id)


def release_owner(data_root: DataRoot, settings: Settings, instance_id: str) -> None:
    host.remove_link(tap_name(instance_id))
    pool(data_root, settings).release(instance_id)
