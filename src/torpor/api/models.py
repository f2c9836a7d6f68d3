"""Request and response bodies of the REST API (what the OpenAPI document describes)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from torpor.codec import Codec
from torpor.instances.info import InstanceInfo
from torpor.instances.metadata import CompressionPolicy
from torpor.instances.observe import StageProgress
from torpor.remote.location import LOCATION_PATTERN, SNAPSHOT_URL_PATTERN

MAX_TIMEOUT = 3600.0
# The same rules the library enforces, stated in the schema so clients can see them.
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
OPERATION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


def _integral(value: object) -> object:
    """JSON Schema counts 2.0 as an integer; strict pydantic would not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integral = BeforeValidator(_integral)
ZstdLevel = Annotated[int, Field(ge=-7, le=19), Integral]
Lz4Level = Annotated[int, Field(ge=0, le=12), Integral]
MemoryMib = Annotated[int, Field(ge=64, le=1 << 20), Integral]
Cpus = Annotated[int, Field(ge=1, le=64), Integral]
DiskMib = Annotated[int, Field(ge=1024, le=1 << 24), Integral]
ForkCount = Annotated[int, Field(ge=1, le=64), Integral]
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=63)]
ImageReference = Annotated[str, StringConstraints(min_length=1, max_length=512,
                                                  pattern=r"^[!-~]+$")]
Arg = Annotated[str, StringConstraints(max_length=4096, pattern=r"^[^\x00]*$")]
EnvItem = Annotated[str, StringConstraints(max_length=4096, pattern=r"^[^=\x00]+=[^\x00]*$")]
# The pattern torpor.operations.network parses (a test holds the two equal).
PublishSpec = Annotated[str, StringConstraints(pattern=(
    r"^(?:((?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d))"
    r"{3}):)?((?:6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3})):"
    r"((?:6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3}))"
    r"(?:/(tcp))?$"))]
TagKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,63}$")]
TagValue = Annotated[str, StringConstraints(max_length=256, pattern=r"^[^\x00]*$")]


class Body(BaseModel):
    """Request bodies: unknown fields and loose types (false for a number) are errors."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _Compressed(Body):
    mode: Literal["sync", "background"] = Field(
        "sync", description="background: save raw now, compress later in a job")
    delay_s: float = Field(0.0, ge=0, le=7 * 86400,
                           description="background only: wait this long first")


class ZstdCompression(_Compressed):
    codec: Literal["zstd"]
    level: ZstdLevel | None = Field(None, json_schema_extra={"not": {"const": 0}},
                              description="1..19, or the fast levels -7..-1; default 1")


class AutoCompression(_Compressed):
    codec: Literal["auto"] = Field(description="zstd that stores raw what does not compress;"
                                   " compressed after the paused window")
    level: ZstdLevel | None = Field(None, json_schema_extra={"not": {"const": 0}},
                              description="zstd's level for what compresses; default 1")


class Lz4Compression(_Compressed):
    codec: Literal["lz4"]
    level: Lz4Level | None = Field(None, description="0 (fastest, default)..12")


class NoCompression(Body):
    codec: Literal["none"] = Field(description="explicitly off: wins over any default")


Compression = Annotated[AutoCompression | ZstdCompression | Lz4Compression | NoCompression,
                        Field(discriminator="codec")]


def to_policy(compression: Compression | None) -> CompressionPolicy | None:
    """The API's per-codec shapes → the library's policy (None: not given)."""
    if compression is None:
        return None
    if isinstance(compression, NoCompression):
        return CompressionPolicy(codec=Codec.NONE)
    auto = isinstance(compression, AutoCompression)
    return CompressionPolicy(codec=Codec.ZSTD if auto else Codec(compression.codec),
                             level=compression.level, mode=compression.mode,
                             delay_s=compression.delay_s, store_incompressible=auto)


class ErrorBody(BaseModel):
    """Every error response: a stable code and a readable message."""

    code: str
    message: str


class CreateRequest(Body):
    name: Name = Field(description="1-63 lowercase letters, digits and '-'")
    memory_mib: MemoryMib = Field(512, description="at most the host's RAM (else 400)")
    cpus: Cpus = 1
    disk_mib: DiskMib = Field(
        2048, description="root disk size (sparse); at least the image's 1 GiB")
    memory_backing: Literal["anonymous", "file"] = Field(
        "anonymous", description="file: memory-file mode (RAM in a file; device-state "
        "snapshots, forks map the RAM copy-on-write)")
    snapshot_policy: Compression | None = Field(
        None, description="the instance's standby compression policy")
    network: Literal["user", "bridge", "none"] | None = Field(
        None, description="user (QEMU user mode), bridge (own address on torpor's bridge), "
        "none; default: the server's network.default")
    publish: list[PublishSpec] = Field(
        default_factory=list, description="[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp]; the host "
        "address defaults to 127.0.0.1")
    allow_peers: bool = Field(
        False, description="bridge: may reach, and be reached by, other instances that "
        "allow peer traffic (guests are isolated from each other by default)")
    image: ImageReference | None = Field(
        None, description="an OCI image (pulled if missing); none: the built-in guest")
    entrypoint: list[Arg] | None = Field(None, description="replaces the image's Entrypoint")
    cmd: list[Arg] | None = Field(None, description="replaces the image's Cmd")
    env: list[EnvItem] = Field(default_factory=list, description="KEY=VALUE, over the image's")
    workdir: Arg | None = None
    user: Arg | None = None
    insecure: bool = Field(False, description="plain HTTP to a registry that is not loopback")


class PullRequest(Body):
    reference: ImageReference = Field(description="e.g. busybox, ghcr.io/owner/app:1.2")
    insecure: bool = Field(False, description="plain HTTP to a registry that is not loopback")


S3Location = Annotated[str, Field(pattern=LOCATION_PATTERN, max_length=1024,
                                   description="s3://BUCKET/PREFIX")]
S3SnapshotUrl = Annotated[str, Field(pattern=SNAPSHOT_URL_PATTERN, max_length=1024,
                                     description="s3://BUCKET/PREFIX/SNAPSHOT")]


class SnapshotPushRequest(Body):
    url: S3Location = Field(description="s3://BUCKET/PREFIX: where it goes")
    name: Name | None = Field(None, description="its name in the bucket (default: its own)")


class SnapshotPullRequest(Body):
    url: S3SnapshotUrl
    name: Name | None = Field(None, description="its name here (default: its name there)")


class StartRequest(Body):
    wait_agent: bool = Field(True, description="return once the guest agent answers")


class StopRequest(Body):
    timeout: float = Field(10.0, ge=0, le=MAX_TIMEOUT,
                           description="seconds for a clean power-off before quit, then kill")
    force: bool = False


class StandbyRequest(Body):
    compression: Compression | None = Field(
        None, description="overrides the instance's policy and the server default")


IdleTime = Annotated[float, Field(
    ge=0, le=30 * 86400, description="seconds idle; 0: never", examples=[300, 0])]
HoldTime = Annotated[float, Field(
    gt=0, le=7 * 86400, description="seconds, at most a week", examples=[600])]


class PolicyRequest(Body):
    """Fields left out stay as they are."""

    policy: Compression | None = Field(
        None, description="standby compression; null: the server default")
    auto_standby: IdleTime | None = Field(
        None, description="idle time before the daemon puts the instance in standby; "
        "null: the server default")


class HoldRequest(Body):
    duration: HoldTime = 600


class WakeResult(BaseModel):
    woke: bool = Field(description="true if it was in standby and this wake restored it")
    instance: InstanceInfo


class WakeRecord(Body):
    """What a relay saw of one wake: from the first held connection's accept to its
    first byte forwarded to the guest, or the error that closed the held connections."""

    ok: bool
    seconds: float = Field(ge=0, le=86400)
    error: str | None = Field(None, max_length=1000)


class ForkRequest(Body):
    new_name: Name = Field(description="with count > 1: NAME-1 .. NAME-count")
    count: ForkCount = 1
    target_state: Literal["running", "standby", "stopped"] = "running"


class SnapshotRequest(Body):
    name: Name | None = Field(None, description="default: a timestamp")
    tags: dict[TagKey, TagValue] = Field(
        default_factory=dict, json_schema_extra={"additionalProperties": False})
    serial: bool = Field(False, description="save, then copy (default: both while paused)")
    compression: Compression | None = Field(
        None, description="default: the instance's policy, then the server's; `sync`"
        " compresses as the state is saved, `background` leaves it to a job on the stored"
        " snapshot")


class ExecRequest(Body):
    argv: list[str] = Field(min_length=1, max_length=4096)
    stdin_b64: str | None = Field(None, description="standard input, base64",
                                  pattern=BASE64_PATTERN)
    timeout: float = Field(60.0, gt=0, le=MAX_TIMEOUT)


class ExecResponse(BaseModel):
    exit_code: int
    signal: int | None = None
    stdout_b64: str
    stderr_b64: str
    truncated: bool = Field(False, description="the guest agent kept only the first "
                                               "16 MiB of stdout or of stderr")


class OperationState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Operation(BaseModel):
    """One long-running request, pollable at /operations/{id} while it runs and after."""

    id: str
    kind: str
    instance: str | None = None
    # api: a client asked; idle: the daemon's auto-standby; traffic: a wake on traffic
    trigger: Literal["api", "idle", "traffic"] = "api"
    state: OperationState
    started_at: datetime
    finished_at: datetime | None = None
    progress: list[StageProgress] = Field(default_factory=list)
    phases: dict[str, float] = Field(default_factory=dict)
    error: ErrorBody | None = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
