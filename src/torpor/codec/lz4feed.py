"""lz4 states fed to a reader in-process, as zstd frames are (codec/frames.py).

The `lz4` tool writes 64 KiB at a time into QEMU's pipe, and a restore of a half-random
512 MiB guest took 2x raw's time through it. An lz4 file (the frame format: header, then
blocks of up to 4 MiB, each stored compressed or, where it did not shrink, as it is) is
cut here into pieces tiling it: a stored block is sent from the file by the kernel, a
compressed one decompressed (liblz4, through the `lz4` package), the rest (headers, end
marks, checksums: the state file has its own) hashed and skipped. A frame with linked
blocks (`lz4 -BD`, which torpor never writes) is decompressed whole.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Generator, Iterator

import lz4.block
import lz4.frame

from torpor.codec.frames import Frame, FrameError, Hasher, feed_pieces

MAGIC = 0x184D2204
SKIPPABLE, SKIPPABLE_MASK = 0x184D2A50, 0xFFFFFFF0
_STORED = 0x80000000
_INDEPENDENT, _BLOCK_CHECKSUM, _CONTENT_SIZE, _CONTENT_CHECKSUM, _DICT_ID = (
    0x20, 0x10, 0x08, 0x04, 0x01)
BLOCK_SIZE_CODES = range(4, 8)  # 64 KiB, 256 KiB, 1 MiB, 4 MiB
LARGEST_BLOCK = 4 << 20


def _u32(fd: int, offset: int) -> int:
    data = os.pread(fd, 4, offset)
    if len(data) < 4:
        raise FrameError(f"the lz4 file is cut short at byte {offset}")
    return int.from_bytes(data, "little")


def pieces(fd: int) -> Iterator[Frame]:
    """The file's pieces, in order (pread: the fd's offset is not moved): a block
    (`raw`: stored; `packed`: compressed) with any header before it, an end mark, a
    skippable frame, or a linked frame whole (neither raw nor packed)."""
    offset, size = 0, os.fstat(fd).st_size
    while offset < size:
        magic = _u32(fd, offset)
        if magic & SKIPPABLE_MASK == SKIPPABLE:
            length = 8 + _u32(fd, offset + 4)
            yield Frame(offset, length, [])
            offset += length
            continue
        if magic != MAGIC:
            raise FrameError(f"no lz4 frame at byte {offset}")
        offset = yield from _frame(fd, offset)


def _frame(fd: int, start: int) -> Generator[Frame, None, int]:
    """The pieces of the lz4 frame at `start`; returns where it ends. Its header goes
    with its first block (or with its end mark, if it has none)."""
    descriptor = os.pread(fd, 2, start + 4)
    if len(descriptor) < 2 or descriptor[0] >> 6 != 1:
        raise FrameError(f"an lz4 frame of an unknown version at byte {start}")
    flags = descriptor[0]
    if descriptor[1] >> 4 & 7 not in BLOCK_SIZE_CODES:
        raise FrameError(f"an lz4 frame with an unknown block size at byte {start}")
    header = 7 + (8 if flags & _CONTENT_SIZE else 0) + (4 if flags & _DICT_ID else 0)
    block_extra = 4 if flags & _BLOCK_CHECKSUM else 0
    linked = not flags & _INDEPENDENT
    position, piece_start = start + header, start
    while (value := _u32(fd, position)) != 0:  # 0: the end mark
        data = (position + 4, value & ~_STORED)
        position = data[0] + data[1] + block_extra
        if not linked:
            stored = bool(value & _STORED)
            yield Frame(piece_start, position - piece_start, [data] if stored else None,
                        None if stored else data)
            piece_start = position
    end = position + 4 + (4 if flags & _CONTENT_CHECKSUM else 0)
    if linked:  # one piece, decompressed whole
        yield Frame(start, end - start, None)
    else:  # the end mark and content checksum: hashed, nothing to send
        yield Frame(piece_start, end - piece_start, [])
    return end


def decode(data: memoryview, piece: Frame, _: bytearray) -> tuple[bytes, int]:
    """A compressed block's content (or a linked frame's, whole)."""
    try:
        if piece.packed is None:
            content = lz4.frame.decompress(data)
        else:
            start, length = piece.packed
            at = start - piece.offset
            content = lz4.block.decompress(data[at:at + length],
                                           uncompressed_size=LARGEST_BLOCK)
    except (RuntimeError, lz4.block.LZ4BlockError) as exc:
        raise FrameError(f"an lz4 block at byte {piece.offset} does not decompress: "
                         f"{exc}") from None
    return content, len(content)


def feed(path: os.PathLike[str] | str, sink: int, stop: threading.Event,
         progress: Callable[[int], None] | None = None,
         hasher: Hasher | None = None) -> None:
    """`frames.feed` for an lz4 file."""
    feed_pieces(path, sink, stop, pieces, decode, progress, hasher)
