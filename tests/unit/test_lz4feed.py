"""lz4 states fed in-process (codec/lz4feed.py): files the `lz4` tool wrote, with every
option a stored state may carry (as torpor writes them, with lz4's own checksums as
older states have them, linked blocks, small blocks, two frames), give back the exact
bytes and the stored file's hash; damage is an error, never a stream."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_frames import mixed_stream, read_through_socket
from torpor.codec import Codec, checksum_file, compressor_argv
from torpor.codec.frames import FrameError
from torpor.codec.lz4feed import feed, pieces


def lz4(data: bytes, *options: str) -> bytes:
    return subprocess.run(["lz4", "-q", "-c", *options], input=data, capture_output=True,
                          check=True).stdout


@pytest.mark.parametrize("options", [
    tuple(compressor_argv(Codec.LZ4, 1)[3:]),  # as torpor writes them
    ("-1",),  # lz4's content checksum (states written before session 14)
    ("-1", "-BD"),  # linked blocks: decompressed whole
    ("-1", "-B4", "-BX"),  # 64 KiB blocks with block checksums
])
def test_feed_gives_back_the_bytes_and_the_files_hash(tmp_path: Path,
                                                      options: tuple[str, ...]) -> None:
    data = mixed_stream()
    path = tmp_path / "state.lz4"
    path.write_bytes(lz4(data, *options))
    got, digest = read_through_socket(path, hashed=True, feeder=feed)
    assert got == data
    assert digest == checksum_file(path).checksum
    with open(path, "rb") as f:
        kinds = {(p.raw is not None and p.raw != [], p.packed is not None)
                 for p in pieces(f.fileno())}
    if "-BD" not in options:  # random blocks stored, text compressed: both ways used
        assert {(True, False), (False, True)} <= kinds


def test_two_frames_and_a_skippable_one(tmp_path: Path) -> None:
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    path = tmp_path / "state.lz4"
    path.write_bytes(lz4(b"first " * 1000) + skippable + lz4(os.urandom(70_000)))
    got, _ = read_through_socket(path, hashed=False, feeder=feed)
    assert got[:6000] == b"first " * 1000 and len(got) == 76_000


@pytest.mark.parametrize("damage", ["magic", "cut", "block"])
def test_a_damaged_file_is_an_error(tmp_path: Path, damage: str) -> None:
    stored = bytearray(lz4(mixed_stream(), "-1", "--no-frame-crc"))
    if damage == "magic":
        stored[0] ^= 0xFF
    elif damage == "cut":
        del stored[len(stored) // 2:]
    else:  # the compressed (text) block's content
        text_at = stored.find(b"line ")
        stored[text_at - 64:text_at + 64] = bytes(128)
    path = tmp_path / "state.lz4"
    path.write_bytes(bytes(stored))
    with pytest.raises(FrameError):
        read_through_socket(path, hashed=True, feeder=feed)
