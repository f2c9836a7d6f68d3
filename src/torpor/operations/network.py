"""Instances' networks: for a bridged one an address from the data root's pool at create
and fork, the bridge and the instance's TAP before each QEMU start (they outlive QEMU
across standby), both released at delete; for every mode, the relay of published ports.
`network/` does the host side; this module decides whose address, TAP and ports they
are."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys

from torpor.errors import Busy, InvalidArgument, OperationFailed
from torpor.fsutil import atomic_write_json, read_json
from torpor.hypervisor.process import ProcessIdentity, TrackedProcess
from torpor.hypervisor.vmconfig import PortForward, VMConfig
from torpor.instances.context import InstanceContext, Settings
from torpor.instances.metadata import InstanceMetadata, NetworkMode, NetworkSpec, tap_name
from torpor.network import dns, firewall, host
from torpor.network.addresses import AddressPool
from torpor.paths import DataRoot, InstancePaths

MODES = ("user", "bridge", "none")


def pool(data_root: DataRoot, settings: Settings) -> AddressPool:
    return AddressPool(settings.network_subnet, data_root.network_leases,
                       data_root.network_lock)


def assign(data_root: DataRoot, settings: Settings, instance_id: str,
           mode: NetworkMode | None, *, allow_peers: bool = False) -> NetworkSpec:
    """A new instance's network (`mode` None: the configured default); a bridged one
    gets its own address (the caller releases it if the instance is not published)."""
    mode = mode or settings.network_default
    if mode not in MODES:
        raise InvalidArgument(f"--network must be one of {', '.join(MODES)}, not {mode!r}")
    if allow_peers and mode != "bridge":
        raise InvalidArgument("--allow-peers needs --network bridge")
    if mode != "bridge":
        return NetworkSpec(mode=mode)
    lease = pool(data_root, settings).allocate(instance_id)
    return NetworkSpec(mode="bridge", ip=lease.address, prefix=lease.prefix,
                       gateway=lease.gateway, bridge=settings.network_bridge,
                       allow_peers=allow_peers)


def attach(ctx: InstanceContext, config: VMConfig) -> VMConfig:
    """Before each QEMU start: a bridged instance's bridge (with its rules and DNS) and
    TAP exist; published ports are relayed to the guest. Returns the config QEMU runs
    (in user mode, with the loopback forwards the relay connects to)."""
    spec, forwards = ctx.meta.network, ctx.meta.port_forwards
    targets: dict[str, tuple[str, int]] = {}
    if spec.mode == "bridge":
        bridge, tap = spec.bridge or ctx.settings.network_bridge, tap_name(ctx.meta.id)
        with pool(ctx.data_root, ctx.settings).locked():
            bring_up(ctx.data_root, ctx.settings, bridge)
            if spec.allow_peers and not host.link_exists(tap):
                # Into the peers set by name, before the TAP exists: never a peer's TAP
                # outside it, and no nft run on the restores that find the TAP there.
                firewall.add_peer(bridge, tap)
            host.ensure_tap(tap, bridge, isolated=not spec.allow_peers)
        targets = {_key(f): (spec.ip or "", f.guest_port) for f in forwards}
    elif spec.mode == "user" and forwards:
        # QEMU's hostfwd on a free loopback port per published port: the published
        # port itself stays the relay's, across standby too.
        loopback = [PortForward(host_addr="127.0.0.1", host_port=_free_loopback_port(),
                                guest_port=f.guest_port) for f in forwards]
        config = config.model_copy(update={"port_forwards": tuple(loopback)})
        targets = {_key(f): ("127.0.0.1", lf.host_port)
                   for f, lf in zip(forwards, loopback, strict=True)}
    if targets:
        ctx.paths.publish_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(ctx.paths.publisher_targets, targets)
        start_publisher(ctx)
    return config


def _key(forward: PortForward) -> str:
    return f"{forward.host_addr}:{forward.host_port}"


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bring_up(data_root: DataRoot, settings: Settings, bridge: str) -> None:
    """The bridge with the pool's gateway address, its rules and its DNS (the caller
    holds the pool's lock). The rules go in before the bridge exists and only then (nft
    matches interfaces by name): never a bridge without them, and no `nft` run on every
    restore. `torpor check` puts back rules that were flushed since."""
    address_pool = pool(data_root, settings)
    if not host.link_exists(bridge):
        firewall.apply(bridge, settings.network_subnet, nat=settings.network_nat)
    host.ensure_bridge(bridge, address_pool.gateway, address_pool.network.prefixlen)
    dns.ensure(address_pool.gateway, data_root.dns_pid_file(bridge), data_root.dns_log(bridge),
               list(settings.network_dns))


def orphaned_taps(bridge: str, instance_ids: set[str]) -> list[str]:
    """TAPs on the bridge that none of these instances has (a crash's leftovers)."""
    taps = {tap_name(instance_id) for instance_id in instance_ids}
    return [port for port in host.bridge_ports(bridge)
            if port.startswith("tp") and port not in taps]


def repair_bridge(data_root: DataRoot, settings: Settings,
                  metas: list[InstanceMetadata], present: set[str]) -> None:
    """`torpor check`: TAPs no instance has removed (`present`: the ids of every
    instance directory, its metadata readable or not); the rules (with the peers) and DNS
    put back while an address is leased, else the bridge torn down."""
    bridge = settings.network_bridge
    bridged = [m for m in metas if m.network.mode == "bridge"]
    with pool(data_root, settings).locked() as leases:
        for port in orphaned_taps(bridge, present):
            host.remove_link(port)
        if not leases:
            tear_down(data_root, settings, bridge)
            return
        peers = tuple(sorted(tap_name(m.id) for m in bridged if m.network.allow_peers))
        firewall.apply(bridge, settings.network_subnet, nat=settings.network_nat, peers=peers)
        bring_up(data_root, settings, bridge)


def tear_down(data_root: DataRoot, settings: Settings, bridge: str) -> None:
    """The bridge, its rules and its DNS gone (the caller holds the pool's lock and no
    address is leased): a host without bridged instances keeps nothing of torpor's."""
    dns.stop(data_root.dns_pid_file(bridge))
    host.remove_link(bridge)
    firewall.remove(bridge)


def start_publisher(ctx: InstanceContext) -> None:
    """The relay of the instance's published ports, unless it runs. The ports are bound
    here, so one in use fails this start at once; the relay is handed the sockets and
    the lock (inherited descriptors) and outlives QEMU across standby."""
    forwards, paths = ctx.meta.port_forwards, ctx.paths
    lock_fd = os.open(paths.publisher_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    sockets: list[socket.socket] = []
    ready_read, ready_write = os.pipe()
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # it runs
        for forward in forwards:
            sockets.append(_bind(forward.host_addr, forward.host_port))
        argv = [sys.executable, "-m", "torpor.api.relay", "--lock-fd", str(lock_fd),
                "--ready-fd", str(ready_write), "--identity", str(paths.publisher_identity),
                "--targets", str(paths.publisher_targets),
                # wake on traffic: a connection while in standby asks the daemon to restore
                "--instance", ctx.name, "--standby-dir", str(paths.standby_dir),
                "--data-root", str(ctx.data_root.root),
                "--activity", str(paths.publisher_activity)]
        for sock, forward in zip(sockets, forwards, strict=True):
            argv += ["--listen", f"{sock.fileno()}={_key(forward)}"]
        paths.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(paths.publisher_log, "ab") as log:
            # Detached (setsid -f): no child of ours to reap, and it outlives this process.
            subprocess.run(["setsid", "-f", *argv], stdin=subprocess.DEVNULL, stdout=log,
                           stderr=log, check=True,
                           pass_fds=(lock_fd, ready_write, *(s.fileno() for s in sockets)))
        os.close(ready_write)
        ready_write = -1
        # One byte once its identity is written; EOF (b"") if it died first.
        if os.read(ready_read, 1) != b"1":
            raise OperationFailed(f"the relay of {ctx.name}'s published ports did not "
                                  f"start: see {paths.publisher_log}")
    finally:
        for sock in sockets:
            sock.close()
        os.close(lock_fd)
        os.close(ready_read)
        if ready_write >= 0:
            os.close(ready_write)


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
        release_owner(data_root, settings, meta.id, meta.network.bridge,
                      peer=meta.network.allow_peers)


def release_owner(data_root: DataRoot, settings: Settings, instance_id: str,
                  bridge: str | None = None, *, peer: bool = False) -> None:
    """An instance's TAP and address gone; with the last address, the bridge too."""
    bridge, tap = bridge or settings.network_bridge, tap_name(instance_id)
    with pool(data_root, settings).locked() as leases:
        host.remove_link(tap)
        if peer:
            firewall.remove_peer(bridge, tap)
        for address in [a for a, owner in leases.items() if owner == instance_id]:
            del leases[address]
        if not leases and host.link_exists(bridge):
            tear_down(data_root, settings, bridge)
