"""zstd frames (codec/frames.py): what the writer stores is plain zstd, `auto` stores raw
only what does not compress, and the feeder gives back the exact bytes and hash."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from torpor.codec import checksum_file, stored_hasher
from torpor.codec.frames import (
    CHUNK,
    PROBE,
    FeedAbandoned,
    FrameError,
    FrameWriter,
    compresses,
    encode,
    feed,
    frames,
)


def mixed_stream() -> bytes:
    """Random chunks, a compressible one, and a short random tail."""
    text = b"".join(b"line %d of a compressible guest page\n" % i for i in range(200_000))
    return os.urandom(2 * CHUNK) + text[:CHUNK] + os.urandom(12_345)


def write_frames(path: Path, data: bytes, *, auto: bool) -> FrameWriter:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        writer = FrameWriter(fd, 1, store_incompressible=auto, threads=2)
        for start in range(0, len(data), 100_000):  # the pump's uneven pieces
            writer.write(memoryview(data)[start:start + 100_000])
        writer.close()
    finally:
        os.close(fd)
    return writer


def read_through_socket(path: Path, *, hashed: bool,
                        feeder: Callable[..., None] = feed) -> tuple[bytes, str | None]:
    reader, writer = socket.socketpair()
    hasher = stored_hasher() if hashed else None
    fd = writer.detach()
    failure: list[BaseException] = []

    def feeding() -> None:
        try:
            feeder(path, fd, threading.Event(), hasher=hasher)
        except BaseException as exc:
            failure.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=feeding)
    thread.start()
    got = bytearray()
    while chunk := reader.recv(1 << 20):
        got += chunk
    thread.join()
    reader.close()
    if failure:
        raise failure[0]
    return bytes(got), hasher.hexdigest() if hasher is not None else None


@pytest.mark.parametrize("auto", [True, False])
def test_frames_are_plain_zstd_and_what_does_not_compress_is_stored_raw(
        tmp_path: Path, auto: bool) -> None:
    data = mixed_stream()
    path = tmp_path / "state.zst"
    stats = write_frames(path, data, auto=auto).stats
    out = subprocess.run(["zstd", "-q", "-d", "-c", str(path)], capture_output=True,
                         check=True).stdout
    assert out == data
    assert stats.chunks == 4 and stats.raw_bytes == len(data)
    assert stats.stored_raw == 3  # the random ones (auto: without compressing them first)
    assert stats.stored_bytes == path.stat().st_size < len(data)
    with open(path, "rb") as f:
        kinds = [frame.raw is not None for frame in frames(f.fileno())]
    # zstd itself stores random data in raw blocks: the feeder sends those either way
    assert kinds == [True, True, False, True]


@pytest.mark.parametrize("auto", [True, False])
def test_a_frame_that_saves_little_is_stored_raw_and_decodes_the_same(auto: bool) -> None:
    """A chunk mostly random with some text where the probe looks: the probe finds it
    compressible, zstd stores its random blocks raw and compresses the rest, and the frame
    would save ~2 %: not worth decompressing at every load. Half text: compressed."""
    text = b"".join(b"line %d of a compressible guest page\n" % i for i in range(60_000))
    quarter = CHUNK // 4
    mostly_random = b"".join(text[:PROBE] + os.urandom(quarter - PROBE) for _ in range(4))
    assert compresses(memoryview(mostly_random), 1)
    for chunk, stored_raw in ((mostly_random, True),
                              (os.urandom(CHUNK // 2) + text[:CHUNK // 2], False)):
        parts, raw = encode(memoryview(chunk), 1, store_incompressible=auto)
        assert raw is stored_raw
        frame = b"".join(bytes(part) for part in parts)
        assert zstandard.ZstdDecompressor().decompress(frame) == chunk
        assert (len(frame) > len(chunk)) is stored_raw


@pytest.mark.parametrize("hashed", [True, False])
def test_feed_gives_back_the_bytes_and_the_stored_files_hash(tmp_path: Path,
                                                            hashed: bool) -> None:
    data = mixed_stream()
    path = tmp_path / "state.zst"
    write_frames(path, data, auto=True)
    got, digest = read_through_socket(path, hashed=hashed)
    assert got == data
    if hashed:
        assert digest == checksum_file(path).checksum



def test_feed_decompresses_frames_written_by_others_of_any_size(tmp_path: Path) -> None:
    """Frames torpor did not write (the `zstd` tool: one frame larger than a chunk, and
    one small one) are decompressed into the feeder's buffer, grown as needed."""
    text = b"".join(b"guest page line %d\n" % i for i in range(700_000))  # > 2 chunks
    path = tmp_path / "state.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=1).compress(text)
                     + zstandard.ZstdCompressor(level=1).compress(b"tail"))
    assert len(text) > 2 * CHUNK
    got, digest = read_through_socket(path, hashed=True)
    assert got == text + b"tail"
    assert digest == checksum_file(path).checksum

def test_a_file_that_is_not_zstd_frames_is_an_error_not_a_stream(tmp_path: Path) -> None:
    path = tmp_path / "state.zst"
    write_frames(path, mixed_stream(), auto=True)
    with open(path, "r+b") as f:  # the second frame's magic number damaged
        f.seek(next(iter(frames(f.fileno()))).length)
        f.write(b"junk")
    with pytest.raises(FrameError, match="no zstd frame at byte"):
        read_through_socket(path, hashed=True)


def test_a_reader_that_stops_reading_lets_the_feeder_go(tmp_path: Path) -> None:
    path = tmp_path / "state.zst"
    write_frames(path, mixed_stream(), auto=True)
    reader, writer = socket.socketpair()
    stop = threading.Event()
    outcome: list[BaseException] = []

    def feeding() -> None:
        try:
            feed(path, writer.fileno(), stop)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=feeding)
    thread.start()
    reader.recv(1)  # the feed has begun; nothing more is read
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], FeedAbandoned)
    reader.close()
    writer.close()
