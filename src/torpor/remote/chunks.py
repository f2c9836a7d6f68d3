"""Files cut into chunks for content addressing, and a chunk's object (a zstd frame).

Two ways to cut, by how a file changes between related snapshots (measured on four forks
of one 512 MiB guest, docs/design.md "Chunks"):
- a file written in place (a disk, a RAM file) changes block by block at fixed offsets:
  fixed, aligned chunks (BLOCK bytes), so an unchanged block is the same chunk in every
  snapshot; holes and all-zero chunks are recorded as holes, not stored;
- a stream (a saved machine state) shifts: one page more or less early in it moves
  every later byte, and fixed chunks then share almost nothing (3.0x the bytes for four
  forks against 1.36x here): content-defined chunks (FastCDC, pyfastcdc), whose bounds
  follow the content and realign after a change.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torpor.codec import frames
from torpor.fsutil import data_extents

BLOCK = 512 << 10
STREAM_AVERAGE = 512 << 10  # FastCDC: chunks of 128 KiB..2 MiB, ~640 KiB on average
LEVEL = 1  # zstd level of a chunk's object: fast enough to stay off the critical path
_ZEROS = bytes(max(BLOCK, 4 * STREAM_AVERAGE))

Cutting = Literal["block", "stream"]


@dataclass(frozen=True)
class Piece:
    """A chunk of a file: where it is, its bytes, and their hash (its name)."""

    offset: int
    data: bytes | memoryview
    digest: str

    @property
    def length(self) -> int:
        return len(self.data)


def digest_of(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def is_zero(data: bytes | memoryview) -> bool:
    return len(data) <= len(_ZEROS) and data == memoryview(_ZEROS)[:len(data)]


def pieces(path: Path, cutting: Cutting) -> Iterator[Piece]:
    """The file's chunks that hold data, in order (holes and zero chunks left out)."""
    cut = _block_cuts(path) if cutting == "block" else _stream_cuts(path)
    for offset, data in cut:
        if not is_zero(data):
            yield Piece(offset, data, digest_of(data))


def _block_cuts(path: Path) -> Iterator[tuple[int, bytes]]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        next_block = 0
        for start, end in data_extents(fd):
            block = max(start - start % BLOCK, next_block)
            while block < end:
                data = os.pread(fd, BLOCK, block)
                if not data:
                    return
                yield block, data
                block += BLOCK
            next_block = block
    finally:
        os.close(fd)


def _stream_cuts(path: Path) -> Iterator[tuple[int, memoryview]]:
    from pyfastcdc import FastCDC

    if path.stat().st_size == 0:  # nothing to map
        return
    for chunk in FastCDC(STREAM_AVERAGE).cut_file(path):
        yield chunk.offset, chunk.data


def encode(data: bytes | memoryview) -> bytes:
    """A chunk's object: one zstd frame, raw blocks where the data does not compress."""
    parts, _ = frames.encode(memoryview(data), LEVEL, store_incompressible=True)
    return b"".join(parts)


class ChunkDamaged(ValueError):
    pass


def decode(body: bytes, length: int, digest: str) -> bytes:
    """A chunk's bytes from its object, checked against the name it is stored under."""
    try:
        data = frames.decode(body, length)
    except frames.FrameError as exc:
        raise ChunkDamaged(f"chunk {digest}: {exc}") from None
    if digest_of(data) != digest:
        raise ChunkDamaged(f"chunk {digest} does not hash to its name")
    return data
