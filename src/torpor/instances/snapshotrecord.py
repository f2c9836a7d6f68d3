"""What is stored about a stored snapshot (its record.json), what `snapshot list` and
`show` report of it, and the rules for its name and tags. The snapshots themselves are
made and used in operations/snapshots.py."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from torpor.codec import Codec
from torpor.errors import InvalidArgument, NotFound
from torpor.fsutil import atomic_write_json, read_json
from torpor.instances.info import CompressionStatus
from torpor.instances.metadata import NAME_RE, CompressionPlan
from torpor.paths import DataRoot, SnapshotPaths

RECORD_VERSION = 1
TAG_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")

SnapshotKind = Literal["running", "standby", "stopped"]


class SnapshotFields(BaseModel):
    """What a stored snapshot is: what its record and what `list`/`show` share."""

    version: int = RECORD_VERSION
    id: str
    name: str
    source_id: str
    source_name: str
    kind: SnapshotKind
    mode: Literal["overlapped", "serial", "copy"]
    created_at: datetime
    tags: dict[str, str] = Field(default_factory=dict)
    logical_bytes: int = 0
    bytes_written: int = 0
    copy_method: str = ""
    state_codec: Codec | None = None
    state_bytes: int | None = None
    phases: dict[str, float] = Field(default_factory=dict)


class SnapshotRecord(SnapshotFields):
    """record.json."""

    # A background compression of the payload's machine state still to do (as an
    # instance's metadata keeps its standby state's): survives restarts.
    compression_plan: CompressionPlan | None = None


class SnapshotInfo(SnapshotFields):
    """What `snapshot list` and `show` report: the record and its state's compression
    (the plan itself stays internal, as an instance's does), and what it occupies on disk
    now (`logical_bytes` counts a sparse disk's holes; compression shrinks the state)."""

    compression: CompressionStatus
    stored_bytes: int = 0


def load_record(paths: SnapshotPaths) -> SnapshotRecord:
    return SnapshotRecord.model_validate(read_json(paths.record))


def save_record(paths: SnapshotPaths, record: SnapshotRecord) -> None:
    atomic_write_json(paths.record, record.model_dump(mode="json", exclude={"compression"}))


def parse_tags(items: list[str]) -> dict[str, str]:
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidArgument(f"tags look like key=value: {item!r}")
        tags[key] = value
    return validate_tags(tags)


def validate_tags(tags: dict[str, str]) -> dict[str, str]:
    for key, value in tags.items():
        if not TAG_RE.fullmatch(key) or len(value) > 256 or "\x00" in value:
            raise InvalidArgument(f"bad tag {key!r}: keys are letters, digits and _.-, "
                                  "values at most 256 characters")
    return tags


def validate_snapshot_name(name: str) -> str:
    if len(name) > 63 or not NAME_RE.fullmatch(name):
        raise InvalidArgument(f"invalid snapshot name {name!r}: use 1-63 lowercase letters,"
                              " digits and '-'")
    return name


def all_records(data_root: DataRoot) -> list[SnapshotRecord]:
    records = []
    if data_root.snapshots_dir.exists():
        for entry in sorted(data_root.snapshots_dir.iterdir()):
            if not entry.name.startswith("."):
                try:
                    records.append(load_record(data_root.snapshot(entry.name)))
                except (FileNotFoundError, ValueError):
                    continue
    return sorted(records, key=lambda r: r.created_at)


def find_record(data_root: DataRoot, name_or_id: str, source_id: str | None = None
                ) -> SnapshotRecord:
    matches = [r for r in all_records(data_root)
               if name_or_id in (r.id, r.name) and source_id in (None, r.source_id)]
    if not matches:
        raise NotFound(f"no snapshot named {name_or_id!r}")
    if len(matches) > 1:
        raise InvalidArgument(f"snapshot name {name_or_id!r} exists for several instances:"
                              " name the instance too, or use the snapshot id")
    return matches[0]
