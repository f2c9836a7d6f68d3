"""The codec tools' command lines (codec/codecs.py), run on real data."""

from __future__ import annotations

import os
import subprocess

from torpor.codec import Codec
from torpor.codec.codecs import compressor_argv, decompressor_argv

LZ4_MAGIC = (0x184D2204).to_bytes(4, "little")
CONTENT_CHECKSUM = 0x04  # the frame descriptor's FLG bit


def test_lz4_states_carry_no_content_checksum_of_their_own() -> None:
    # The stored file's own xxh3-128 is checked at every load; lz4's xxh32 over the
    # output only doubled `lz4 -d`'s time.
    data = os.urandom(1 << 20) + b"compressible " * 100_000
    stored = subprocess.run(compressor_argv(Codec.LZ4, 1), input=data, capture_output=True,
                            check=True).stdout
    assert stored[:4] == LZ4_MAGIC and not stored[4] & CONTENT_CHECKSUM
    assert subprocess.run(decompressor_argv(Codec.LZ4), input=stored, capture_output=True,
                          check=True).stdout == data
