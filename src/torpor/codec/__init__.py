"""Compression codecs (zstd frames written and read in-process, codec/frames.py; lz4
written by its tool and read in-process, codec/lz4feed.py) and the stored-file checksum.

Knows nothing of VMs or snapshots.
"""

from torpor.codec.codecs import (
    CHECKSUM_ALGORITHM,
    SUFFIXES,
    Codec,
    StreamStats,
    checksum_file,
    compressor_argv,
    decompressor_argv,
    parse_codec,
    parse_compression,
    sparse_decompressor_argv,
    stored_hasher,
    validate_level,
)

__all__ = [
    "CHECKSUM_ALGORITHM",
    "SUFFIXES",
    "Codec",
    "StreamStats",
    "checksum_file",
    "compressor_argv",
    "decompressor_argv",
    "parse_codec",
    "parse_compression",
    "sparse_decompressor_argv",
    "stored_hasher",
    "validate_level",
]
