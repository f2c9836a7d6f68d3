"""Streaming compression codecs (zstd, lz4) and the stored-file checksum.

Knows nothing of VMs or snapshots: it moves bytes between file descriptors.
"""

from torpor.codec.codecs import (
    SUFFIXES,
    Codec,
    StreamStats,
    checksum_file,
    compress_fd_to_file,
    decompress_file_to_fd,
    new_hasher,
    parse_codec,
    validate_level,
)

__all__ = ["SUFFIXES", "Codec", "StreamStats", "checksum_file",
           "compress_fd_to_file", "decompress_file_to_fd", "new_hasher",
           "parse_codec", "validate_level"]
