"""What is stored about an instance. State is never stored: it is derived (see state.py)."""

from __future__ import annotations

import re
import secrets
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from torpor.codec import Codec, validate_level
from torpor.errors import InvalidArgument
from torpor.fsutil import atomic_write_json, read_json
from torpor.hypervisor.accel import AccelChoice
from torpor.hypervisor.vmconfig import PortForward
from torpor.images.imagedisk import RunSpec

NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
METADATA_VERSION = 1
DEFAULT_MEMORY = 512 << 20  # what `create` gives an instance unless told
DEFAULT_DISK = 2 << 30


class InstanceState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    STANDBY = "standby"
    CRASHED = "crashed"
    UNRESPONSIVE = "unresponsive"  # QEMU runs but does not answer its monitor (hung)


def validate_name(name: str) -> str:
    if len(name) > 63 or not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid instance name {name!r}: use 1-63 lowercase letters, digits and '-',"
            " starting and ending with a letter or digit")
    return name


def new_instance_id() -> str:
    return secrets.token_hex(6)


def new_mac() -> str:
    """A locally administered unicast MAC in QEMU's 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def new_vmgenid() -> str:
    return str(uuid.uuid4())


def utc_now() -> datetime:
    return datetime.now(UTC)


class ImageRef(BaseModel):
    """What the instance boots: the built-in guest, or an OCI image (its reference and
    manifest digest, and the command this instance runs from it) on torpor's kernel."""

    name: str
    kernel: Path
    initrd: Path | None
    cmdline: str
    kind: Literal["builtin", "oci"] = "builtin"
    reference: str | None = None
    digest: str | None = None
    run: RunSpec | None = None


class LastOperation(BaseModel):
    kind: str
    result: str  # "ok" or "error"
    started_at: datetime
    phases: dict[str, float] = Field(default_factory=dict)
    error: str | None = None


class CompressionPolicy(BaseModel):
    """How standby state is compressed. An explicit codec "none" disables compression and
    wins over a default that enables it."""

    codec: Codec = Codec.NONE
    level: int | None = None
    mode: Literal["sync", "background"] = "sync"
    delay_s: float = 0.0
    # `auto`: zstd that stores raw the chunks a probe finds incompressible, so turning
    # compression on costs random-data guests next to nothing in the paused window.
    store_incompressible: bool = False

    def effective_level(self) -> int:
        return validate_level(self.codec, self.level)


class CompressionPlan(BaseModel):
    """A background compression still to do: kept in metadata so it survives restarts."""

    codec: Codec
    level: int
    not_before: float  # seconds since the epoch
    error: str | None = None
    store_incompressible: bool = False  # policy auto


def resolve_policy(*candidates: CompressionPolicy | None) -> CompressionPolicy:
    """The first policy given wins: request > instance > server default > none."""
    for candidate in candidates:
        if candidate is not None:
            return candidate
    return CompressionPolicy()


MemoryBacking = Literal["anonymous", "file"]
NetworkMode = Literal["user", "bridge", "none"]


class NetworkSpec(BaseModel):
    """user: QEMU's user-mode network (the default); bridge: a TAP on torpor's bridge
    and an address of its own from the data root's pool (kept across standby, new for a
    fork), isolated from other guests unless both allow peer traffic; none: no network
    device."""

    mode: NetworkMode = "user"
    ip: str | None = None
    prefix: int | None = None
    gateway: str | None = None
    bridge: str | None = None
    allow_peers: bool = False  # bridge: may reach (and be reached by) guests that allow it too

    def kernel_arg(self) -> str:
        """How the guest's init learns its address (both inits read it at boot)."""
        if self.mode == "bridge" and self.ip:
            return f" torpor.net={self.ip}/{self.prefix},{self.gateway}"
        return ""


def tap_name(instance_id: str) -> str:
    """A bridged instance's TAP (interface names have at most 15 characters)."""
    return f"tp{instance_id}"[:15]


class InstanceMetadata(BaseModel):
    version: int = METADATA_VERSION
    id: str
    name: str
    created_at: datetime
    cpus: int
    memory_mib: int
    disk_bytes: int
    mac: str
    image: ImageRef
    accel: AccelChoice = "auto"
    port_forwards: list[PortForward] = Field(default_factory=list)
    snapshot_policy: CompressionPolicy | None = None
    compression_plan: CompressionPlan | None = None
    vmgenid: str | None = None  # QEMU vmgenid device GUID; a fork gets a new one
    origin_snapshot: str | None = None  # the stored snapshot this instance was forked from
    # Guest RAM: anonymous memory, or a file (memory-file mode: standby saves device state
    # only). A file-mode fork maps its snapshot's memory file privately (copy-on-write)
    # instead of having one of its own: memory_origin names that immutable file.
    memory_backing: MemoryBacking = "anonymous"
    memory_origin: Path | None = None
    # The guest returns freed pages to the host (virtio-balloon free page reporting).
    # Anonymous RAM only: QEMU 7.2 discards a file-backed page by punching a hole in the
    # file, which for a memory-file fork is its snapshot's file, shared by every fork.
    # Instances created before it have no such device, and their states none either.
    free_page_reporting: bool = False
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    # The guest has torpor's identity helper on its own port (guest/identity.py): the
    # default guest and OCI images built since it exists. Older instances: the agent.
    identity_helper: bool = False
    last_operation: LastOperation | None = None
    guest_clock_source: str | None = None  # the guest kernel's clocksource, read at boot
    # Seconds idle before the daemon puts it in standby; 0: never; None: the server default.
    auto_standby: float | None = None
    extra: dict[str, Any] = Field(default_factory=dict)

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: Path) -> InstanceMetadata:
        return cls.model_validate(read_json(path))
