"""Every setting of torpor, declared once: its config key, default, description and
environment variable. `torpor.config` validates them (a pydantic model whose fields take
their defaults and descriptions from here, and a test holds the two to the same keys);
the CLI's flags take their help from here (`help_for`), and `find_daemon` their names.
This module imports nothing heavy: every CLI call reads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torpor.paths import DEFAULT_DATA_ROOT


@dataclass(frozen=True)
class Setting:
    key: str  # the TOML path: "compression.jobs"
    description: str
    default: Any = None
    default_factory: Callable[[], Any] | None = None
    env_name: str | None = None  # default: TORPOR_ + the key in capitals

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.key.split("."))

    @property
    def env(self) -> str:
        return self.env_name or "TORPOR_" + self.key.replace(".", "_").upper()

    def default_value(self) -> Any:
        return self.default_factory() if self.default_factory else self.default


SETTINGS: list[Setting] = [
    Setting("data_root", "where instances, snapshots and the daemon's socket live",
            DEFAULT_DATA_ROOT),
    Setting("listen", "the daemon's address: unix:PATH or HOST:PORT"
            " (default: unix:<data_root>/torpord.sock)"),
    Setting("accel", "accelerator: auto (probe KVM, fall back to TCG), kvm or tcg", "auto"),
    Setting("token_file", "the daemon's bearer token (default: <data_root>/api-token)"),
    Setting("compression.default", "standby compression when neither the request nor the"
            " instance says: auto (zstd storing raw what does not compress), zstd, lz4, none,"
            " or codec:level", "none",
            env_name="TORPOR_DEFAULT_COMPRESSION"),
    Setting("compression.level", "the default codec's level"),
    Setting("compression.mode", "sync: compress while saving; background: save raw,"
            " compress later", "sync"),
    Setting("compression.delay", "background: wait this long first (30s, 5m)", 0.0),
    Setting("compression.jobs", "background jobs at once (default: cores)",
            default_factory=lambda: os.cpu_count() or 1),
    Setting("compression.rate_limit", "bytes/s a background job reads (200M; default: no"
            " cap)"),
    Setting("auto_standby", "the daemon puts a running instance that has been idle this long"
            " into standby (5m, 30s; 0 or off: never) unless its own policy says", "0"),
    Setting("auto_standby_cpu", "an instance whose vCPUs were busier than this share of"
            " the time (0.2: 20 %) in the idle clock's last round is not idle", 0.2),
    Setting("network.default", "a new instance's network when create does not say: user"
            " (QEMU's user mode), bridge (a TAP on torpor's bridge, an address of its own)"
            " or none", "user"),
    Setting("network.bridge", "the bridge bridged instances' TAPs join (one per data root)",
            "torpor0"),
    Setting("network.subnet", "bridged instances' addresses (the bridge takes the first)",
            "10.213.0.0/24"),
    Setting("network.nat", "bridged guests reach the outside through NAT (nftables"
            " masquerade; the host then forwards IPv4)", True),
    Setting("network.dns", "the resolvers bridged guests' DNS forwards to, comma-separated"
            " (IP or IP#PORT; default: the host's /etc/resolv.conf)", ""),
    Setting("restore_pool", "the daemon keeps a QEMU started and waiting for up to this"
            " many memory-file instances in standby, so their restore skips QEMU's start"
            " (0: none)", 0),
    Setting("compression.memory_file_delay", "memory-file mode: compress the RAM file after"
            " this idle time", 300.0, env_name="TORPOR_MEMORY_COMPRESSION_DELAY"),
]
_BY_KEY = {s.key: s for s in SETTINGS}


def setting(key: str) -> Setting:
    """The declaration of `key` ("compression.jobs")."""
    return _BY_KEY[key]


def help_for(key: str) -> str:
    """A flag's help: the setting's description, and where else it can be set."""
    s = setting(key)
    return f"{s.description[:1].upper()}{s.description[1:]} (config {key}, ${s.env})."


def default_path(key: str) -> Path:
    return Path(str(setting(key).default_value()))
