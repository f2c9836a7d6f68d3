"""The host side of bridged guests, through netlink (pyroute2): torpor's bridge with the
pool's gateway address, and one persistent TAP per instance on it. A TAP is persistent
so it outlives QEMU across standby: the bridge port, its neighbours and routes stay put,
and the guest's connections carry on when a restored QEMU attaches to it again. Every
TAP is an isolated bridge port unless its instance allows peer traffic: guests do not
reach each other (only non-isolated ports, the bridge itself and peers, are reachable
from an isolated one; firewall.py keeps peers from reaching isolated guests)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torpor.errors import OperationFailed

if TYPE_CHECKING:
    from pyroute2 import IPRoute

SYS_NET = Path("/sys/class/net")
# pyroute2 is loaded on first use, in the thread that needs it: it takes ~100 ms to import,
# which must not happen on the daemon's event loop (operations import this module).


def _ipr() -> IPRoute:
    from pyroute2 import IPRoute

    return IPRoute()


def _netlink_error() -> type[Exception]:
    from pyroute2.netlink.exceptions import NetlinkError

    error: type[Exception] = NetlinkError
    return error


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def ensure_bridge(name: str, gateway: str, prefix: int) -> None:
    with _ipr() as ipr:
        index = _index(ipr, name)
        try:
            if index is None:
                ipr.link("add", ifname=name, kind="bridge")
                index = _index(ipr, name)
            assert index is not None
            addresses = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)}
            if gateway not in addresses:
                ipr.addr("add", index=index, address=gateway, prefixlen=prefix)
            ipr.link("set", index=index, state="up")
        except _netlink_error() as exc:
            raise OperationFailed(f"setting up bridge {name} failed: {exc}") from None


def ensure_tap(name: str, bridge: str, *, isolated: bool = True) -> None:
    """A persistent TAP on the bridge, up, isolated unless told otherwise."""
    with _ipr() as ipr:
        try:
            if _index(ipr, name) is None:
                ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            index, master = _index(ipr, name), _index(ipr, bridge)
            if index is None or master is None:
                raise OperationFailed(f"TAP {name} or bridge {bridge} is missing")
            ipr.link("set", index=index, master=master)
            ipr.brport("set", index=index, isolated=1 if isolated else 0)
            ipr.link("set", index=index, state="up")
        except _netlink_error() as exc:
            raise OperationFailed(f"setting up TAP {name} failed: {exc}") from None


def remove_link(name: str) -> None:
    if not link_exists(name):
        return  # without loading pyroute2
    with _ipr() as ipr:
        index = _index(ipr, name)
        if index is not None:
            try:
                ipr.link("del", index=index)
            except _netlink_error() as exc:
                if getattr(exc, "code", None) != 19:  # ENODEV: someone else removed it
                    raise OperationFailed(f"removing {name} failed: {exc}") from None


def link_exists(name: str) -> bool:
    """By sysfs (the network namespace's own, as `ip netns exec` mounts it): cheap, and
    no pyroute2 import for instances that have no TAP."""
    return (SYS_NET / name).exists()


def bridge_ports(bridge: str) -> list[str]:
    """The interfaces enslaved to `bridge` (none if it does not exist)."""
    try:
        return sorted(p.name for p in (SYS_NET / bridge / "brif").iterdir())
    except OSError:
        return []
