"""A pushed snapshot's manifest: its files as chunk lists, and whatever the puller needs
to know before it downloads anything."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from torpor.errors import IntegrityError
from torpor.remote.chunks import Cutting

FORMAT = 1


class ChunkRef(BaseModel):
    offset: int = Field(ge=0)
    length: int = Field(gt=0)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")


class RemoteFile(BaseModel):
    """One file: its size, and its chunks (what lies between them is a hole)."""

    path: str  # relative, '/'-separated
    size: int = Field(ge=0)
    cutting: Cutting
    chunks: list[ChunkRef]

    def stored_bytes(self) -> int:
        return sum(c.length for c in self.chunks)


class HostNeeds(BaseModel):
    """What a host must offer to run the snapshot. `qemu_version` and `accel` only when
    the snapshot holds a machine state (a stopped one boots anew, anywhere)."""

    qemu_version: str | None
    accel: str | None
    machine: str
    cpu_model: str
    memory_backing: str  # checked by the puller: a newer torpor may know more kinds


class BootFiles(BaseModel):
    """The guest image's boot files the snapshot's instance uses (kernel, initrd): a host
    that has no image directory of this name gets it from the bucket too."""

    directory: str
    files: list[RemoteFile]


class RemoteSnapshot(BaseModel):
    format: int = FORMAT
    name: str
    pushed_at: datetime
    record: dict[str, Any]  # the snapshot's record.json as it was pushed
    needs: HostNeeds
    files: list[RemoteFile]
    boot: BootFiles | None = None

    def all_files(self) -> list[RemoteFile]:
        return self.files + (self.boot.files if self.boot else [])

    def digests(self) -> set[str]:
        return {c.digest for f in self.all_files() for c in f.chunks}

    def encode(self) -> bytes:
        return self.model_dump_json(indent=1).encode()

    @classmethod
    def decode(cls, body: bytes, where: str) -> RemoteSnapshot:
        try:
            raw = json.loads(body)
        except ValueError as exc:
            raise IntegrityError(f"{where}: the manifest is not JSON ({exc})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else None
            raise IntegrityError(f"{where}: manifest format {found}; this torpor reads {FORMAT}")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise IntegrityError(f"{where}: invalid manifest: {exc.errors()[0]['msg']}"
                                 f" at {'.'.join(map(str, exc.errors()[0]['loc']))}") from None
