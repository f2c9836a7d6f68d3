"""zstd and lz4 through their native command-line tools, plus the stored-file checksum.

Measured here (bench/codec_bench.py, 2 GiB guest): streaming through the native tools beat
the in-process zstandard/lz4 bindings on the save of random RAM (zstd 3.65 s vs 5.06 s) and
on 3 of 4 loads (zstd idle 0.16 s vs 0.28 s, random 1.04 s vs 2.04 s), and
decompressing to tmpfs first was never the fastest. So lz4 and the background job's zstd
are processes on a pipe. Sync zstd saves are now frames written on a thread pool
(codec/frames.py): per-chunk frames let several threads compress and let a load skip the
decompressor for what was stored raw, which the single streaming binding could not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum

import xxhash

from torpor.errors import InvalidArgument

CHUNK = 1 << 20
CHECKSUM_ALGORITHM = "xxh3_128"


class Codec(StrEnum):
    NONE = "none"
    ZSTD = "zstd"
    LZ4 = "lz4"


SUFFIXES = {Codec.ZSTD: ".zst", Codec.LZ4: ".lz4"}
DEFAULT_LEVELS = {Codec.NONE: 0, Codec.ZSTD: 1, Codec.LZ4: 0}
# zstd: 1..19, plus the fast levels -7..-1 (`--fast=N`); lz4: 0 (fastest) .. 12 (HC).
LEVEL_RANGES = {Codec.NONE: range(0, 1), Codec.ZSTD: range(-7, 20), Codec.LZ4: range(0, 13)}


AUTO = "auto"  # zstd that stores raw what does not compress (codec/frames.py)


def parse_codec(name: str) -> Codec:
    return parse_compression(name)[0]


def parse_compression(name: str) -> tuple[Codec, bool]:
    """A compression's name → its codec, and whether it stores raw what does not
    compress (`auto`)."""
    text = name.strip().lower()
    if text == AUTO:
        return Codec.ZSTD, True
    try:
        return Codec(text), False
    except ValueError:
        raise InvalidArgument(
            f"unknown compression {name!r}: use auto, zstd, lz4 or none") from None


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


def compressor_argv(codec: Codec, level: int) -> list[str]:
    """A filter from stdin to stdout. One zstd worker thread: QEMU keeps the other core."""
    if codec is Codec.ZSTD:
        level_arg = f"--fast={-level}" if level < 0 else f"-{level}"
        return ["zstd", "-q", "-c", "-T1", level_arg]
    if codec is Codec.LZ4:
        # levels 0 and 1 are the same. No content checksum: the stored file has its own
        # (xxh3-128, checked at every load), and lz4's xxh32 over the output was half of
        # `lz4 -d`'s time (0.17 against 0.08 s for 300 MB here).
        return ["lz4", "-q", "-c", "--no-frame-crc", f"-{max(level, 1)}"]
    raise ValueError("no compressor for uncompressed state")


def decompressor_argv(codec: Codec, path: os.PathLike[str] | str | None = None) -> list[str]:
    """Decompress `path` (default: stdin) to stdout."""
    if codec is Codec.NONE:
        raise ValueError("nothing to decompress")
    return [str(codec), "-q", "-d", "-c", *([os.fspath(path)] if path is not None else [])]


def sparse_decompressor_argv(codec: Codec, src: os.PathLike[str] | str,
                             dst: os.PathLike[str] | str) -> list[str]:
    """Decompress file to file, leaving zero runs as holes (not written zeros)."""
    if codec is Codec.ZSTD:
        return ["zstd", "-q", "-d", "--sparse", "-f", os.fspath(src), "-o", os.fspath(dst)]
    if codec is Codec.LZ4:
        return ["lz4", "-q", "-d", "--sparse", "-f", os.fspath(src), os.fspath(dst)]
    raise ValueError("nothing to decompress")


@dataclass
class StreamStats:
    stored_bytes: int = 0
    checksum: str = ""


def stored_hasher() -> xxhash.xxh3_128:
    """The hash (CHECKSUM_ALGORITHM) of a stored file, fed as its bytes are written."""
    return xxhash.xxh3_128()


def checksum_file(path: os.PathLike[str] | str) -> StreamStats:
    stats = StreamStats()
    hasher = stored_hasher()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            stats.stored_bytes += len(chunk)
    stats.checksum = hasher.hexdigest()
    return stats
