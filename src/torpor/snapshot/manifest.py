"""The manifest of a saved machine state: what QEMU needs to accept it, and how to
check that the stored file is the one that was written."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from torpor.codec import SUFFIXES, Codec
from torpor.errors import IntegrityError, NotFound
from torpor.fsutil import atomic_write_json, read_json
from torpor.hypervisor.vmconfig import VMConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MACHINE_STATE = "machine-state"  # the raw name; compressed files add a suffix
MEMORY_FILE = "memory"  # memory-file mode: guest RAM, in the instance directory


class LeftOutZeroPages(BaseModel):
    """Zero-page records of RAM block `block` the stream leaves out (a QEMU receiving a
    state holds that block zero-filled)."""

    block: str
    pages: int


class StateFile(BaseModel):
    """The machine-state file. `name` is always the raw name; the codec's suffix is added
    to find a compressed file."""

    name: str = MACHINE_STATE
    codec: Codec = Codec.NONE
    level: int = 0
    raw_bytes: int | None = None
    stored_bytes: int = 0
    checksum_algorithm: str = "xxh3_128"
    checksum: str | None = None  # of the stored bytes; None only if a crash cut it short
    zero_pages: LeftOutZeroPages | None = None

    def stored_name(self) -> str:
        return self.name + SUFFIXES.get(self.codec, "")


class MemoryFileRecord(BaseModel):
    """Memory-file mode: guest RAM stays in this file (relative to the instance
    directory) and the state file holds the device state only."""

    name: str = MEMORY_FILE
    size_bytes: int
    allocated_bytes: int
    # A background job may compress it (name + suffix); readers decompress it first.
    codec: Codec = Codec.NONE
    level: int = 0
    stored_bytes: int | None = None


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    # stream: RAM and devices in the state file. memory-file: devices only; RAM is in
    # `memory_file`. Either way a file-backed VM's stream is written with x-ignore-shared.
    kind: Literal["stream", "memory-file"] = "stream"
    memory_file: MemoryFileRecord | None = None
    created_at: datetime
    qemu_version: str
    vm_config: VMConfig
    guest_visible: dict[str, Any]
    state: StateFile
    phases: dict[str, float] = Field(default_factory=dict)

    @property
    def x_ignore_shared(self) -> bool:
        """Written with QEMU's x-ignore-shared (file-backed RAM), so read with it."""
        return self.vm_config.memory_file is not None

    def save(self, directory: Path) -> None:
        atomic_write_json(directory / MANIFEST, self.model_dump(mode="json"))

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        try:
            raw = read_json(path)
        except FileNotFoundError:
            raise NotFound(f"no saved state in {directory}") from None
        except ValueError as exc:
            raise IntegrityError(f"manifest {path} is not valid JSON: {exc}") from exc
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if version != FORMAT_VERSION:
            raise IntegrityError(
                f"saved state has format version {version}; this torpor reads {FORMAT_VERSION}")
        try:
            return cls.model_validate(raw)
        except ValueError as exc:
            raise IntegrityError(f"manifest {path} is malformed: {exc}") from exc


def locate_state_file(directory: Path, state: StateFile) -> tuple[Path, Codec]:
    """The raw file if present, else the compressed sibling found by its suffix."""
    raw = directory / state.name
    if raw.exists():
        return raw, Codec.NONE
    for codec, suffix in SUFFIXES.items():
        candidate = directory / (state.name + suffix)
        if candidate.exists():
            return candidate, codec
    raise IntegrityError(f"the machine-state file {state.name}[.zst|.lz4] is missing from "
                         f"{directory}")
