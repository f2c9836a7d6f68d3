"""What `show` and `list` report about an instance (the CLI, the API and its client
share it)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field

from torpor.instances.metadata import InstanceState, LastOperation, MemoryBacking


class CompressionState(StrEnum):
    NONE = "none"
    PENDING = "pending"
    COMPRESSING = "compressing"
    COMPRESSED = "compressed"
    ERROR = "error"


class CompressionStatus(BaseModel):
    state: CompressionState
    algorithm: str | None = None
    raw_bytes: int | None = None
    compressed_bytes: int | None = None
    not_before: float | None = None
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.raw_bytes and self.compressed_bytes:
            return self.raw_bytes / self.compressed_bytes
        return None


class NetworkInfo(BaseModel):
    mode: str  # user, bridge or none
    ip: str | None = None  # bridge: the instance's own address
    mac: str
    bridge: str | None = None
    allow_peers: bool = False
    published: list[str] = Field(default_factory=list)


class InstanceInfo(BaseModel):
    """What `show` and `list` report."""

    name: str
    id: str
    state: InstanceState
    cpus: int
    memory_mib: int
    disk_bytes: int
    mac: str
    memory_backing: MemoryBacking = "anonymous"
    created_at: datetime
    pid: int | None = None
    accel: str | None = None
    path: Path
    last_operation: LastOperation | None = None
    image: str = "builtin"  # an OCI image's reference
    image_digest: str | None = None
    exit_code: int | None = None  # an image's main process, once it exited (stopped)
    network: NetworkInfo | None = None
    # Seconds idle before the daemon's standby (0: never), the instance's or the default.
    auto_standby: float = 0.0
    held_until: datetime | None = None  # `torpor hold`, while in force
    compression: CompressionStatus
