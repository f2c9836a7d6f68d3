"""zstd and lz4 as streams between a file descriptor and a file.

The checksum (xxh3-128) is always of the bytes as stored, computed while they are
written or read, so integrity costs no extra pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, BinaryIO

import lz4.frame
import xxhash
import zstandard

from torpor.errors import InvalidArgument

CHUNK = 1 << 20
CHECKSUM_ALGORITHM = "xxh3_128"


class Codec(StrEnum):
    NONE = "none"
    ZSTD = "zstd"
    LZ4 = "lz4"


SUFFIXES = {Codec.ZSTD: ".zst", Codec.LZ4: ".lz4"}
DEFAULT_LEVELS = {Codec.NONE: 0, Codec.ZSTD: 1, Codec.LZ4: 0}
# zstd: 1..19, plus the library's negative "fast" levels; lz4: 0 (fastest) .. 12 (HC).
LEVEL_RANGES = {Codec.NONE: range(0, 1), Codec.ZSTD: range(-7, 20), Codec.LZ4: range(0, 13)}


def parse_codec(name: str) -> Codec:
    try:
        return Codec(name.strip().lower())
    except ValueError:
        raise InvalidArgument(
            f"unknown compression {name!r}: use zstd, lz4 or none") from None


def validate_level(codec: Codec, level: int | None) -> int:
    if level is None:
        return DEFAULT_LEVELS[codec]
    allowed = LEVEL_RANGES[codec]
    if level not in allowed or (codec is Codec.ZSTD and level == 0):
        if codec is Codec.NONE:
            raise InvalidArgument("--level makes no sense without compression")
        raise InvalidArgument(f"{codec} level must be in {allowed.start}..{allowed.stop - 1}"
                              + (" (not 0)" if codec is Codec.ZSTD else "") + f", not {level}")
    return level


def new_hasher() -> Any:
    return xxhash.xxh3_128()


@dataclass
class StreamStats:
    raw_bytes: int = 0
    stored_bytes: int = 0
    checksum: str = ""
    consumer_gone: bool = False  # the reader closed the pipe before the end


class _Compressor:
    def __init__(self, codec: Codec, level: int) -> None:
        self._obj: Any
        if codec is Codec.ZSTD:
            # One worker thread: the compression leaves the GIL, QEMU keeps the other core.
            self._obj = zstandard.ZstdCompressor(level=level, threads=1).compressobj()
            self._head = b""
        elif codec is Codec.LZ4:
            self._obj = lz4.frame.LZ4FrameCompressor(compression_level=level)
            self._head = self._obj.begin()
        else:
            self._obj = None
            self._head = b""

    def feed(self, chunk: bytes) -> bytes:
        head, self._head = self._head, b""
        return head + (self._obj.compress(chunk) if self._obj is not None else chunk)

    def finish(self) -> bytes:
        head, self._head = self._head, b""
        if self._obj is None:
            return head
        return head + bytes(self._obj.flush())


def compress_fd_to_file(src_fd: int, dst: BinaryIO, codec: Codec, level: int,
                        progress: Callable[[int], None] | None = None) -> StreamStats:
    """Read src_fd (a pipe) to EOF, write it compressed to dst, hash what is stored."""
    stats = StreamStats()
    hasher = new_hasher()
    compressor = _Compressor(codec, level)

    def emit(data: bytes) -> None:
        if data:
            dst.write(data)
            hasher.update(data)
            stats.stored_bytes += len(data)

    while chunk := os.read(src_fd, CHUNK):
        stats.raw_bytes += len(chunk)
        emit(compressor.feed(chunk))
        if progress is not None:
            progress(len(chunk))
    emit(compressor.finish())
    dst.flush()
    stats.checksum = hasher.hexdigest()
    return stats


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def decompress_file_to_fd(src: BinaryIO, dst_fd: int, codec: Codec,
                          progress: Callable[[int], None] | None = None) -> StreamStats:
    """Stream a stored file into dst_fd (a pipe), decompressing and hashing on the way."""
    stats = StreamStats()
    hasher = new_hasher()
    decompressor: Any = None
    if codec is Codec.ZSTD:
        decompressor = zstandard.ZstdDecompressor().decompressobj()
    elif codec is Codec.LZ4:
        decompressor = lz4.frame.LZ4FrameDecompressor()
    while chunk := src.read(CHUNK):
        hasher.update(chunk)
        stats.stored_bytes += len(chunk)
        if stats.consumer_gone:
            continue  # still hash to the end: the checksum decides what went wrong
        data = decompressor.decompress(chunk) if decompressor is not None else chunk
        stats.raw_bytes += len(data)
        try:
            _write_all(dst_fd, data)
        except BrokenPipeError:
            stats.consumer_gone = True
        if progress is not None:
            progress(len(chunk))
    stats.checksum = hasher.hexdigest()
    return stats


def checksum_file(path: os.PathLike[str] | str) -> StreamStats:
    stats = StreamStats()
    hasher = new_hasher()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            stats.stored_bytes += len(chunk)
    stats.raw_bytes = stats.stored_bytes
    stats.checksum = hasher.hexdigest()
    return stats
