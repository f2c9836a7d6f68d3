"""Bridged networking for instances: an address from the data root's pool at create and
fork, the bridge and the instance's TAP before each QEMU start (they outlive QEMU across
standby), both released at delete. `network/` does the host side; this module decides
whose address and TAP they are."""

from __future__ import annotations

from torpor.errors import InvalidArgument
from torpor.instances.context import InstanceContext, Settings
from torpor.instances.metadata import InstanceMetadata, NetworkMode, NetworkSpec, tap_name
from torpor.network import firewall, host
from torpor.network.addresses import AddressPool
from torpor.paths import DataRoot

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


def release(data_root: DataRoot, settings: Settings, meta: InstanceMetadata) -> None:
    """A deleted instance's address and TAP go (idempotent)."""
    if meta.network.mode != "bridge":
        return
    host.remove_link(tap_name(meta.id))
    pool(data_root, settings).release(meta.id)
