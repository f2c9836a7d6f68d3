"""Where a daemon would listen, and whether one does. Asked by every CLI command before
anything else, so this module loads neither the server (uvicorn and FastAPI: ~0.2 s) nor
pydantic (~0.1 s): `find_daemon` reads the three settings it needs (torpor/settings.py)
from the same file, variables and flag as `torpor.config` does (a unit test holds the two
to the same answer), and leaves validating everything else to whoever loads the whole
config."""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torpor.errors import InvalidArgument
from torpor.paths import DataRoot
from torpor.settings import default_path, setting

SYSTEM_CONFIG = Path("/etc/torpor/torpor.toml")
CONFIG_ENV = "TORPOR_CONFIG"
CLIENT_SETTINGS = ("data_root", "listen", "token_file")  # what a client needs to know


@dataclass(frozen=True)
class ListenAddress:
    unix_path: Path | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"


def parse_listen(value: str) -> ListenAddress:
    """'unix:/path/to.sock' or 'HOST:PORT' (an IPv6 host in brackets)."""
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if not path:
            raise InvalidArgument("listen: 'unix:' needs a socket path")
        return ListenAddress(unix_path=Path(path).absolute())
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"listen: {value!r} is neither unix:PATH nor HOST:PORT")
    return ListenAddress(host=host.strip("[]"), port=int(port))


@dataclass(frozen=True)
class DaemonAddress:
    listen: ListenAddress
    token_file: Path


def config_file(path: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The config file in effect: the flag's, else $TORPOR_CONFIG, else the system's."""
    if path is None and environ.get(CONFIG_ENV):
        path = Path(environ[CONFIG_ENV])
    if path is None and SYSTEM_CONFIG.exists():
        path = SYSTEM_CONFIG
    return path


def find_daemon(path: Path | None, data_root: Path | None,
                environ: Mapping[str, str] | None = None) -> DaemonAddress | None:
    """Where the daemon for this configuration listens and its token lies; None when the
    configuration cannot say (unreadable or malformed: the full config reports why)."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    try:
        path = config_file(path, environ)
        if path is not None:
            values.update(tomllib.loads(path.read_text()))
        for key in CLIENT_SETTINGS:
            env = setting(key).env
            if environ.get(env):
                values[key] = environ[env]
        if data_root is not None:
            values["data_root"] = data_root
        root = DataRoot(Path(str(values.get("data_root", default_path("data_root"))))
                        .absolute())
        listen = parse_listen(str(values.get("listen") or f"unix:{root.api_socket}"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, InvalidArgument):
        return None
    token = values.get("token_file")
    return DaemonAddress(listen, Path(str(token)) if token else root.api_token)


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
