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
MAX_BLOCK = {4: 64 << 10, 5: 256 << 10, 6: 1 << 20, 7: 4 << 20}


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
    descriptor = os.pread(fd, 2, start + 4)
    if len(descriptor) < 2 or descriptor[0] >> 6 != 1:
        raise FrameError(f"an lz4 frame of an unknown version at byte {start}")
    flags = descriptor[0]
    if descriptor[1] >> 4 & 7 not in MAX_BLOCK:
        raise FrameError(f"an lz4 frame with an unknown block size at byte {start}")
    header = 7 + (8 if flags & _CONTENT_SIZE else 0) + (4 if flags & _DICT_ID else 0)
    block_extra = 4 if flags & _BLOCK_CHECKSUM else 0
    position, linked = start + header, not flags & _INDEPENDENT
    pending = [Frame(start, header, [])]  # the header goes with the first block
    while True:
        value = _u32(fd, position)
        if value == 0:  # the end mark, and the content checksum
            end = position + 4 + (4 if flags & _CONTENT_CHECKSUM else 0)
            break
        length = value & ~_STORED
        data = (position + 4, length)
        block = Frame(position, 4 + length + block_extra,
                      [data] if value & _STORED else None,
                      None if value & _STORED else data)
        position += block.length
        if linked:
            continue
        pending.append(block)
        yield from _merged(pending)
        pending = []
    if linked:  # one piece, decompressed whole
        yield Frame(start, end - start, None)
    else:
        yield from _merged([*pending, Frame(position, end - position, [])])
    return end


def _merged(parts: list[Frame]) -> Iterator[Frame]:
    """Header-only pieces folded into the block after them (fewer, larger pieces)."""
    head = parts[0]
    for part in parts[1:]:
        if head.raw == [] and head.packed is None:
            head = Frame(head.offset, head.length + part.length, part.raw, part.packed)
        else:
            yield head
            head = part
    yield head


def decode(data: memoryview, piece: Frame, _: bytearray) -> tuple[bytes, int]:
    """A compressed block's content (or a linked frame's, whole)."""
    try:
        if piece.packed is None:
            content = lz4.frame.decompress(data)
        else:
            start, length = piece.packed
            at = start - piece.offset
            content = lz4.block.decompress(data[at:at + length],
                                           uncompressed_size=max(MAX_BLOCK.values()))
    except (RuntimeError, lz4.block.LZ4BlockError) as exc:
        raise FrameError(f"an lz4 block at byte {piece.offset} does not decompress: "
                         f"{exc}") from None
    return content, len(content)


def feed(path: os.PathLike[str] | str, sink: int, stop: threading.Event,
         progress: Callable[[int], None] | None = None,
         hasher: Hasher | None = None) -> None:
    """`frames.feed` for an lz4 file."""
    feed_pieces(path, sink, stop, pieces, decode, progress, hasher)
