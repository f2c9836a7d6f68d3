"""The manifest of a saved machine state: what QEMU needs to accept it, and how to
check that the stored file is the one that was written."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import xxhash
from pydantic import BaseModel, Field

from torpor.codec import SUFFIXES, Codec
from torpor.errors import IntegrityError, NotFound
from torpor.fsutil import atomic_write_json, data_extents, read_json
from torpor.hypervisor.vmconfig import VMConfig

if TYPE_CHECKING:  # the CLI's fast paths read manifests without loading zstandard
    from torpor.codec.frames import FrameStats

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MACHINE_STATE = "machine-state"  # the raw name; compressed files add a suffix
MEMORY_FILE = "memory"  # memory-file mode: guest RAM, in the instance directory
PAGE = 4096
SAMPLED_PAGES = 64


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
    # "frames": zstd written in independent frames by torpor (codec/frames.py), loaded by
    # splicing its raw frames; "stream": one stream from the codec's own tool.
    layout: Literal["stream", "frames"] = "stream"
    chunks: int | None = None  # frames layout: chunks written, and how many stored raw
    stored_raw_chunks: int | None = None

    def stored_name(self) -> str:
        return self.name + SUFFIXES.get(self.codec, "")

    def as_frames(self, level: int, frames: FrameStats, checksum: str | None) -> StateFile:
        """This (raw) state after its file was rewritten as zstd frames."""
        return self.model_copy(update={
            "codec": Codec.ZSTD, "level": level, "raw_bytes": frames.raw_bytes,
            "stored_bytes": frames.stored_bytes, "checksum": checksum, "layout": "frames",
            "chunks": frames.chunks, "stored_raw_chunks": frames.stored_raw})


class FileIdentity(BaseModel):
    """Which file, and whether anything has written to it since: a RAM file replaced (a
    new inode) or written to (a new modification time: writes through QEMU's mapping
    update it too) no longer matches. Not the change time: renaming the file away and back
    changes that, and leaves the RAM as it was."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        st = path.stat()
        return cls(device=st.st_dev, inode=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns)


class PageSample(BaseModel):
    offset: int
    xxh64: str


class MemoryFileRecord(BaseModel):
    """Memory-file mode: guest RAM stays in this file (relative to the instance
    directory) and the state file holds the device state only.

    Restore checks it fail-closed without reading all of it: the file must be the one
    recorded (`identity`, re-recorded whenever torpor itself copies or decompresses it)
    and the sampled pages, taken from its data extents, must hash as they did."""

    name: str = MEMORY_FILE
    size_bytes: int
    allocated_bytes: int
    # A background job may compress it (name + suffix); readers decompress it first.
    codec: Codec = Codec.NONE
    level: int = 0
    stored_bytes: int | None = None
    identity: FileIdentity | None = None
    # A copy of the file torpor is renaming over it (unshare.py): either file is the RAM,
    # so a kill between the rename and the manifest's next save leaves it restorable.
    replacing: FileIdentity | None = None
    samples: list[PageSample] = Field(default_factory=list)


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
    # The guest kernel's clocksource when it was saved (read at boot). Whatever it is, the
    # wall clock continues from the pause; restore sets it from the host's (qemu-ga).
    guest_clock_source: str | None = None

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
            if directory.is_dir():  # a state without its manifest: never loaded blind
                raise IntegrityError(f"the saved state in {directory} has no {MANIFEST}: it"
                                     " cannot be checked, so it is not loaded") from None
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
    """The file the manifest names. The manifest is rewritten only once the file it names
    is complete (a background job publishes the compressed file, then the manifest, then
    drops the raw one), so the named file is the one to trust; a sibling is a leftover."""
    named = directory / state.stored_name()
    if named.exists():
        return named, state.codec
    others = [directory / (state.name + suffix) for suffix in ("", *SUFFIXES.values())]
    found = [p.name for p in others if p.exists()]
    if found:
        raise IntegrityError(f"the manifest in {directory} names {named.name} but only "
                             f"{', '.join(found)} is there")
    raise IntegrityError(f"the machine-state file {named.name} is missing from {directory}")


def sample_pages(path: Path, count: int = SAMPLED_PAGES) -> list[PageSample]:
    """Hashes of `count` pages spread evenly over the file's data (holes read as zeros
    whatever happens, so they would prove nothing)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        extents = list(data_extents(fd))
        pages = [(start // PAGE, -(-end // PAGE)) for start, end in extents]
        total = sum(end - start for start, end in pages)
        if total == 0:
            return []
        wanted = sorted({total * i // count for i in range(min(count, total))})
        samples, passed, index = [], 0, 0
        for start, end in pages:
            while index < len(wanted) and wanted[index] < passed + (end - start):
                offset = (start + wanted[index] - passed) * PAGE
                data = os.pread(fd, PAGE, offset)
                samples.append(PageSample(offset=offset, xxh64=xxhash.xxh64_hexdigest(data)))
                index += 1
            passed += end - start
        return samples
    finally:
        os.close(fd)


def verify_memory_file(path: Path, record: MemoryFileRecord, *, same_file: bool = True) -> None:
    """IntegrityError unless `path` is the RAM file `record` describes: its size, its
    identity (unless `same_file` is False: a copy torpor made), and its sampled pages."""
    try:
        identity = FileIdentity.of(path)
    except FileNotFoundError:
        raise IntegrityError(f"the memory file {path} is missing") from None
    if identity.size != record.size_bytes:
        raise IntegrityError(f"the memory file {path} has {identity.size} bytes; the saved"
                             f" state needs {record.size_bytes}")
    if (same_file and record.identity is not None
            and identity not in (record.identity, record.replacing)):
        raise IntegrityError(f"the memory file {path} was replaced or written to since the"
                             " state was saved (inode or modification time differ)")
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for sample in record.samples:
            if xxhash.xxh64_hexdigest(os.pread(fd, PAGE, sample.offset)) != sample.xxh64:
                raise IntegrityError(f"the memory file {path} does not hold the saved RAM"
                                     f" (page at {sample.offset} differs)")
    finally:
        os.close(fd)


def rebind_memory_file(directory: Path, path: Path) -> None:
    """After torpor copied the RAM file to `path` (a snapshot's payload, an instance
    restored from one): check the copy's pages, then record it as the file to expect."""
    manifest = Manifest.load(directory)
    if manifest.memory_file is None or not path.exists():
        return
    verify_memory_file(path, manifest.memory_file, same_file=False)
    if not manifest.memory_file.samples:  # a snapshot's save does not sample: do it here
        manifest.memory_file.samples = sample_pages(path)
    manifest.memory_file.identity = FileIdentity.of(path)
    manifest.memory_file.replacing = None
    manifest.save(directory)
