"""Snapshots in S3-compatible object storage: the bucket's layout, content-addressed
chunks, and the transfers. Knows files and objects, not instances or VMs: what a
snapshot is made of and where it goes on a host is operations/remote.py's business.

    s3://BUCKET/PREFIX/
      chunks/<sha256>            one chunk of some file: a zstd frame of its bytes, named
                                 by the hash of those (uncompressed) bytes; shared by every
                                 snapshot that has the same bytes
      snapshots/<name>.json      a snapshot's manifest: its files as lists of chunks
                                 (holes left out), its record, what a host needs to load it;
                                 written last, so a snapshot is listed only once whole
"""
