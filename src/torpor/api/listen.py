"""Is a daemon listening? Asked by every CLI command, so this module imports nothing
of the server (uvicorn and FastAPI take ~0.2 s to import; the CLI's answer should not)."""

from __future__ import annotations

import socket

from torpor.config import ListenAddress


def address_family(address: ListenAddress) -> socket.AddressFamily:
    if address.unix_path is not None:
        return socket.AF_UNIX
    return socket.AF_INET6 if ":" in (address.host or "") else socket.AF_INET


def daemon_listening(address: ListenAddress, timeout: float = 1.0) -> bool:
    """Whether something accepts connections at `address`."""
    family = address_family(address)
    target: str | tuple[str, int] = (str(address.unix_path) if address.unix_path
                                     else (address.host or "", address.port or 0))
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(target)
        except OSError:
            return False
    return True
