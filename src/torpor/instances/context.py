"""What every operation on one instance is handed: its metadata, its paths, the
manager's settings, and the state the guard saw under the instance's lock."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torpor.hypervisor.accel import AccelChoice
from torpor.instances.metadata import (
    CompressionPolicy,
    InstanceMetadata,
    InstanceState,
    NetworkMode,
)
from torpor.paths import DataRoot, InstancePaths

if TYPE_CHECKING:  # the model of settings and context stays free of QMP and asyncio
    from torpor.instances.runtime import RuntimeRecord


@dataclass(frozen=True)
class Settings:
    accel: AccelChoice = "auto"
    qemu_binary: str = "qemu-system-x86_64"
    agent_timeout: float = 60.0
    stop_timeout: float = 10.0
    default_compression: CompressionPolicy | None = None
    compression_jobs: int = field(default_factory=lambda: os.cpu_count() or 1)
    compression_rate_limit: int | None = None  # bytes/s read by a background job; None: no cap
    # Memory-file mode, policy not itself background: compress the RAM file after this idle.
    memory_compression_delay: float = 300.0
    auto_standby: float = 0.0  # seconds idle before the daemon's standby; 0: never
    auto_standby_cpu: float = 0.2  # a vCPU share above this in a round is not idle
    restore_pool: int = 0  # the daemon's waiting QEMUs for memory-file standbys; 0: none
    network_default: NetworkMode = "user"
    network_bridge: str = "torpor0"
    network_subnet: str = "10.213.0.0/24"
    network_nat: bool = True
    network_dns: tuple[str, ...] = ()  # bridged guests' upstream resolvers; (): the host's


@dataclass
class InstanceContext:
    data_root: DataRoot
    settings: Settings
    meta: InstanceMetadata
    paths: InstancePaths
    # Derived under the lock after recovery (operations/registry.py): operations act on
    # these, they do not derive or check the state again.
    state: InstanceState = InstanceState.STOPPED
    record: RuntimeRecord | None = None

    @property
    def name(self) -> str:
        return self.meta.name
