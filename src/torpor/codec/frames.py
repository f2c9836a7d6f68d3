"""zstd in independent frames: compressed on threads as the stream is written, stored raw
where it does not compress, and fed back to a reader without copying what was stored raw.

A state written here is an ordinary zstd file (a sequence of frames, which `zstd -d`
reads), one frame per CHUNK of the stream:

- a chunk that compresses is one frame from the zstandard library (level as asked);
- a chunk that does not (policy `auto`: a probe of its first PROBE bytes shrinks by less
  than INCOMPRESSIBLE) is a frame of raw blocks, built here: no compression time spent on
  it in the paused window; so is a chunk whose frame came out no smaller than that (any
  policy): its load then sends it from the file instead of decompressing it.

Chunks are compressed on a pool of threads (zstandard releases the GIL) while later ones
are read, and written in order. On load, `feed` walks the frames: a frame made of raw
blocks (written by `auto`, or by zstd itself for data it could not shrink) is sent from
the file by the kernel (sendfile: no copy through user space), any other is
decompressed.
Measured why (docs/design.md, "Compressed restores"): the pipe into QEMU, not the codec,
made compressed restores slow; a decompressor process copies every byte twice more.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import zstandard

MAGIC = (0xFD2FB528).to_bytes(4, "little")
CHUNK = 4 << 20
PROBE = 64 << 10
INCOMPRESSIBLE = 0.9  # a probe or frame compressing to more than this share: stored raw
BLOCK = 128 << 10  # zstd's largest block
_LAST, _RAW, _RLE = 1, 0, 1


class FrameError(ValueError):
    """The file is not the zstd frames this module reads."""


@dataclass
class FrameStats:
    raw_bytes: int = 0
    stored_bytes: int = 0
    chunks: int = 0
    stored_raw: int = 0  # chunks stored uncompressed (auto)


def stored_frame(chunk: memoryview) -> list[bytes | memoryview]:
    """A zstd frame holding `chunk` as raw blocks (single segment, 4-byte content size, no
    checksum: the state file has its own), as parts to write: the chunk is not copied."""
    size = len(chunk)
    parts: list[bytes | memoryview] = [MAGIC + bytes([0b1010_0000]) + size.to_bytes(4, "little")]
    for start in range(0, max(size, 1), BLOCK):
        block = chunk[start:start + BLOCK]
        last = start + BLOCK >= size
        parts.append(((len(block) << 3) | (_RAW << 1) | int(last)).to_bytes(3, "little"))
        parts.append(block)
    return parts


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor at `level`, kept: a new one per chunk allocated (and, on a
    host that hands freed memory back, faulted in) megabytes of context each time."""
    kept: dict[int, zstandard.ZstdCompressor] = _local.__dict__.setdefault("compressors", {})
    if level not in kept:
        kept[level] = zstandard.ZstdCompressor(level=level)
    return kept[level]


def compresses(chunk: memoryview, level: int) -> bool:
    """Whether PROBE bytes of the chunk, in four slices spread over it (guest RAM mixes
    data within a chunk), shrink enough to be worth compressing."""
    if len(chunk) <= PROBE:
        probe = bytes(chunk)
    else:
        step = len(chunk) // 4
        probe = b"".join(chunk[i * step:i * step + PROBE // 4] for i in range(4))
    return len(_compressor(level).compress(probe)) < len(probe) * INCOMPRESSIBLE


Encoded = tuple[list[bytes | memoryview], bool]  # a frame's parts; stored raw?


def encode(chunk: memoryview, level: int, *, store_incompressible: bool) -> Encoded:
    """One chunk as one frame: compressed, or stored as raw blocks where that saves less
    than INCOMPRESSIBLE says: before compressing it (store_incompressible, and the probe
    says it would not shrink), or after. zstd stores the blocks it cannot shrink raw but
    a frame that mixes them with compressed ones is decompressed whole on every load (a
    compressed block may refer back into raw ones): 8 of the 34 compressed frames of a
    half-random 2 GiB guest's state (zstd-1) saved 0-13 %."""
    if store_incompressible and not compresses(chunk, level):
        return stored_frame(chunk), True
    frame = _compressor(level).compress(chunk)
    if len(frame) >= len(chunk) * INCOMPRESSIBLE:
        return stored_frame(chunk), True
    return [frame], False


def decode(frame: bytes, size: int) -> bytes:
    """A frame written by `encode` (or any zstd frame of `size` bytes) decompressed."""
    kept: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if kept is None:
        kept = _local.decompressor = zstandard.ZstdDecompressor()
    try:
        data = kept.decompress(frame, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise FrameError(f"not a zstd frame of {size} bytes: {exc}") from None
    if len(data) != size:
        raise FrameError(f"a frame of {len(data)} bytes where {size} were expected")
    return data


class FrameWriter:
    """Writes a byte stream to fd `sink` as zstd frames (see the module). `write` from one
    thread; `close` writes the rest (or `abort`), and waits for every compression it
    started: the pool's threads never outlive the writer. Chunk buffers are reused (fresh
    memory is slow to touch on a host that hands freed memory back: bench/hostmem.py)."""

    def __init__(self, sink: int, level: int, *, store_incompressible: bool,
                 threads: int = 2) -> None:
        self.sink, self.level, self.auto = sink, level, store_incompressible
        self.stats = FrameStats()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="zstd-frame")
        self._window = threads * 2  # chunks in flight: bounds memory to ~5 x CHUNK per thread
        self._pending: deque[tuple[Future[Encoded], bytearray]] = deque()
        self._free: list[bytearray] = []
        self._buffer, self._filled = bytearray(CHUNK), 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            take = min(CHUNK - self._filled, len(view))
            self._buffer[self._filled:self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == CHUNK:
                self._submit()

    def close(self) -> FrameStats:
        try:
            if self._filled:
                self._submit()
            while self._pending:
                self._write_next()
        finally:
            self.abort()
        return self.stats

    def abort(self) -> None:
        """After a failed save: drop what is queued, wait for the threads, write nothing."""
        for future, _ in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def _submit(self) -> None:
        buffer, length = self._buffer, self._filled
        self.stats.raw_bytes += length
        chunk = memoryview(buffer)[:length]
        self._pending.append((self._pool.submit(self._encode, chunk), buffer))
        self._buffer = self._free.pop() if self._free else bytearray(CHUNK)
        self._filled = 0
        while len(self._pending) >= self._window:
            self._write_next()

    def _encode(self, chunk: memoryview) -> Encoded:
        return encode(chunk, self.level, store_incompressible=self.auto)

    def _write_next(self) -> None:
        future, buffer = self._pending.popleft()
        parts, raw = future.result()
        size = _write_parts(self.sink, parts, lambda: None)  # a blocking fd: no waits
        self._free.append(buffer)  # written: its memory may hold the next chunk
        self.stats.chunks += 1
        self.stats.stored_raw += raw
        self.stats.stored_bytes += size


def compress_file(source: int, sink: int, level: int, *, store_incompressible: bool,
                  threads: int = 2, each_chunk: Callable[[int], None] | None = None
                  ) -> FrameStats:
    """The file at fd `source` (from its offset) written to fd `sink` as frames.
    `each_chunk(bytes read so far)` runs after each chunk is handed over: it may pace the
    reading, or raise to stop (nothing more is written; the sink is the caller's)."""
    writer = FrameWriter(sink, level, threads=threads, store_incompressible=store_incompressible)
    buffer = bytearray(CHUNK)  # one read buffer, reused (the writer copies out of it)
    try:
        read = 0
        while length := os.readv(source, [buffer]):
            writer.write(memoryview(buffer)[:length])
            read += length
            if each_chunk is not None:
                each_chunk(read)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


@dataclass
class Frame:
    """A piece of a compressed file, the pieces tiling it: a zstd frame here, an lz4 block
    (codec/lz4feed.py). `raw`: the (offset, length) ranges that are its content as stored
    (sent from the file); None: it is decoded."""

    offset: int  # in the file
    length: int
    raw: list[tuple[int, int]] | None
    packed: tuple[int, int] | None = None  # (offset, length) of what a decoder reads


def frames(fd: int) -> Iterator[Frame]:
    """The frames of a zstd file, read through their headers (pread: the fd's offset is
    not moved). Raises FrameError on anything that is not a zstd frame."""
    offset, size = 0, os.fstat(fd).st_size
    while offset < size:
        yield (frame := _frame_at(fd, offset))
        offset += frame.length


def _frame_at(fd: int, offset: int) -> Frame:
    header = os.pread(fd, 18, offset)
    if header[:4] != MAGIC or len(header) < 6:
        raise FrameError(f"no zstd frame at byte {offset}")
    descriptor = header[4]
    fcs_size = {0: 0, 1: 2, 2: 4, 3: 8}[descriptor >> 6]
    single_segment = bool(descriptor & 0x20)
    if single_segment and fcs_size == 0:
        fcs_size = 1
    checksum = 4 if descriptor & 0x04 else 0
    dict_size = {0: 0, 1: 1, 2: 2, 3: 4}[descriptor & 0x03]
    position = offset + 5 + (0 if single_segment else 1) + dict_size + fcs_size
    raw: list[tuple[int, int]] | None = []
    while True:
        block = os.pread(fd, 3, position)
        if len(block) < 3:
            raise FrameError(f"zstd frame at byte {offset} is cut short")
        value = int.from_bytes(block, "little")
        kind, block_size = (value >> 1) & 3, value >> 3
        stored = 1 if kind == _RLE else block_size
        if raw is not None and kind == _RAW:
            raw.append((position + 3, block_size))
        elif kind != _RAW:
            raw = None
        position += 3 + stored
        if value & _LAST:
            break
    position += checksum
    return Frame(offset, position - offset, raw)


def feed(path: os.PathLike[str] | str, sink: int, stop: threading.Event,
         progress: Callable[[int], None] | None = None,
         hasher: Hasher | None = None) -> None:
    """Write the decompressed content of a zstd file to `sink` (a socket or pipe).
    `feed_pieces` with zstd frames; the file is mapped (`_mapped`): `hasher` (if any)
    sees each frame where it lies, the whole file in order (one pass instead of a second
    reader hashing it, which measured faster on 2 cores); raw blocks are sent from the
    file by the kernel (sendfile: no copy here); other frames are decompressed from the
    mapping. Blocking (a thread); `stop` makes it give up (a reader that stopped reading:
    FeedAbandoned); `progress` gets the stored bytes dealt with. `sink` is made
    non-blocking."""
    decompressor = zstandard.ZstdDecompressor()

    def decode(data: memoryview, _: Frame, out: bytearray) -> tuple[bytearray, int]:
        return _decompress_into(decompressor, data, out)

    feed_pieces(path, sink, stop, frames, decode, progress, hasher)


Decode = Callable[[memoryview, Frame, bytearray], tuple[bytes | bytearray, int]]


def feed_pieces(path: os.PathLike[str] | str, sink: int, stop: threading.Event,
                pieces: Callable[[int], Iterator[Frame]], decode: Decode,
                progress: Callable[[int], None] | None = None,
                hasher: Hasher | None = None) -> None:
    """`feed`'s walk over any compressed file `pieces(fd)` cuts into Frames: each hashed
    where it lies, its raw ranges sent by sendfile, or `decode(its bytes, it, a reused
    buffer)` → (the buffer or another, the bytes of content) written."""
    os.set_blocking(sink, False)
    writable = select.poll()
    writable.register(sink, select.POLLOUT)

    def wait() -> None:
        while not writable.poll(_STOP_CHECK_MS):
            if stop.is_set():
                raise FeedAbandoned("the reader stopped reading")

    # One reused buffer to decompress into: a fresh 4 MiB object per frame cost more than
    # the rest of the feed together (new memory is slow to fault in on a host that hands
    # freed memory back: bench/hostmem.py; 122-136 against 52-55 ms for 300 MB).
    content = bytearray(CHUNK)
    source = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _mapped(source) as stored:
            for frame in pieces(source):
                data = stored[frame.offset:frame.offset + frame.length]
                if len(data) < frame.length:
                    raise FrameError("the state file ended inside a frame")
                if hasher is not None:
                    hasher.update(data)
                if frame.raw is None:
                    decoded, size = decode(data, frame, content)
                    if isinstance(decoded, bytearray):
                        content = decoded  # (grown for a larger frame)
                    _write_parts(sink, [memoryview(decoded)[:size]], wait)
                else:
                    for start, length in frame.raw:
                        _send_all(source, start, length, sink, wait)
                data.release()  # the mapping closes only once no view is left
                if progress is not None:
                    progress(frame.length)
    finally:
        os.close(source)


@contextlib.contextmanager
def _mapped(fd: int) -> Iterator[memoryview]:
    """The file, read-only and shared with the page cache: hashed and decompressed where
    it lies, raw blocks sent from the file by the kernel (sendfile). Against reading each
    frame into a buffer, that is one copy of every byte less: the feeder's CPU time went
    from 102-119 to 81-86 ms for a 160 MB frames file (300 MB fed; docs/design.md). The
    state file is not changed while a restore holds the instance."""
    size = os.fstat(fd).st_size
    if size == 0:
        yield memoryview(b"")
        return
    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    view = memoryview(mapping)
    try:
        yield view
    finally:
        # A failure's traceback may still hold a view of a frame: the mapping then goes
        # with it, and the failure is what the caller sees.
        with contextlib.suppress(BufferError):
            view.release()
            mapping.close()


def _decompress_into(decompressor: zstandard.ZstdDecompressor, frame: memoryview,
                     out: bytearray) -> tuple[bytearray, int]:
    """One frame decompressed into `out` (grown if the frame holds more): (out, size)."""
    reader = decompressor.stream_reader(frame, read_across_frames=False)
    size = 0
    while True:
        if size == len(out):
            out.extend(bytes(len(out)))  # (a foreign frame larger than a chunk)
        got = reader.readinto(memoryview(out)[size:])
        if not got:
            return out, size
        size += got


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...


class FeedAbandoned(Exception):
    pass


_STOP_CHECK_MS = 100


def _send_all(source: int, offset: int, length: int, sink: int,
                wait: Callable[[], None]) -> None:
    end = offset + length
    while offset < end:
        try:
            moved = os.sendfile(sink, source, offset, end - offset)
        except BlockingIOError:
            wait()
            continue
        if moved == 0:
            raise FrameError("the state file ended inside a frame")
        offset += moved


def _write_parts(fd: int, parts: list[bytes | memoryview], wait: Callable[[], None]) -> int:
    """Every part written (`wait` called when a non-blocking fd is full); the bytes."""
    views = [memoryview(p) for p in parts]
    total = sum(len(v) for v in views)
    while views:
        try:
            written = os.writev(fd, views[:1024])  # IOV_MAX
        except BlockingIOError:
            wait()
            continue
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
    return total
