"""What every operation on one instance is handed: its metadata, its paths and the
manager's settings."""

from __future__ import annotations

from dataclasses import dataclass

from torpor.hypervisor.accel import AccelChoice
from torpor.instances.metadata import CompressionPolicy, InstanceMetadata
from torpor.paths import DataRoot, InstancePaths


@dataclass(frozen=True)
class Settings:
    accel: AccelChoice = "auto"
    qemu_binary: str = "qemu-system-x86_64"
    agent_timeout: float = 60.0
    stop_timeout: float = 10.0
    default_compression: CompressionPolicy | None = None


@dataclass
class InstanceContext:
    data_root: DataRoot
    settings: Settings
    meta: InstanceMetadata
    paths: InstancePaths

    @property
    def name(self) -> str:
        return self.meta.name
