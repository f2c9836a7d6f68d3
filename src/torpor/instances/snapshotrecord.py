"""What is stored about a stored snapshot (its record.json), and the rules for its name
and tags. The snapshots themselves are made and used in operations/snapshots.py."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from torpor.codec import Codec
from torpor.errors import InvalidArgument
from torpor.instances.metadata import NAME_RE

RECORD_VERSION = 1
TAG_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")

SnapshotKind = Literal["running", "standby", "stopped"]


class SnapshotRecord(BaseModel):
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

