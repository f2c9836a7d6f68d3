"""Compression codecs (zstd, lz4 as native filter processes) and the stored-file checksum.

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
    "sparse_decompressor_argv",
    "stored_hasher",
    "validate_level",
]
