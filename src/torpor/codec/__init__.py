"""Compression codecs (zstd frames in-process, codec/frames.py; lz4 and the background
job's zstd as native filter processes) and the stored-file checksum.

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
