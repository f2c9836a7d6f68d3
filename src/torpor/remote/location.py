"""`s3://BUCKET/PREFIX[/SNAPSHOT]` and the keys under it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torpor.errors import InvalidArgument

# S3's bucket rules (lowercase letters, digits, '.', '-'; 3-63 characters); a prefix's
# parts: letters, digits, '_', '-', '.' (not first: no '.' or '..'); a snapshot's name:
# torpor's. The API's schema uses the same patterns (api/models.py).
BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}"
SNAPSHOT_NAME = r"[a-z0-9][a-z0-9-]{0,62}"
LOCATION_PATTERN = rf"^s3://{BUCKET}(/{SEGMENT})*/?$"
SNAPSHOT_URL_PATTERN = rf"^s3://{BUCKET}(/{SEGMENT})*/{SNAPSHOT_NAME}$"
BUCKET_RE = re.compile(BUCKET)
SEGMENT_RE = re.compile(SEGMENT)
SNAPSHOT_NAME_RE = re.compile(SNAPSHOT_NAME)
CHUNKS = "chunks/"
SNAPSHOTS = "snapshots/"
LOCKS = "locks/"
MANIFEST_SUFFIX = ".json"


@dataclass(frozen=True)
class Location:
    """A bucket and a prefix in it: where one set of snapshots and their chunks live."""

    bucket: str
    prefix: str  # "" or ending in "/"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def chunk_key(self, digest: str) -> str:
        return f"{self.prefix}{CHUNKS}{digest}"

    @property
    def chunks_prefix(self) -> str:
        return self.prefix + CHUNKS

    @property
    def manifests_prefix(self) -> str:
        return self.prefix + SNAPSHOTS

    @property
    def locks_prefix(self) -> str:
        return self.prefix + LOCKS

    def lock_key(self, name: str) -> str:
        return f"{self.prefix}{LOCKS}{name}"

    def manifest_key(self, name: str) -> str:
        return f"{self.prefix}{SNAPSHOTS}{name}{MANIFEST_SUFFIX}"

    def name_of(self, manifest_key: str) -> str | None:
        """The snapshot a key under `manifests_prefix` is the manifest of."""
        name = manifest_key.removeprefix(self.manifests_prefix)
        if name == manifest_key or not name.endswith(MANIFEST_SUFFIX) or "/" in name:
            return None
        return name.removesuffix(MANIFEST_SUFFIX)

    def snapshot_url(self, name: str) -> str:
        return f"{self}/{name}"


def parse_location(url: str) -> Location:
    """`s3://BUCKET` or `s3://BUCKET/PREFIX`: where snapshots are pushed and listed."""
    if not url.startswith("s3://"):
        raise InvalidArgument(f"not an S3 location: {url!r} (expected s3://BUCKET/PREFIX)")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not BUCKET_RE.fullmatch(bucket):
        raise InvalidArgument(f"invalid bucket name {bucket!r} in {url!r}")
    parts = prefix.rstrip("/").split("/") if prefix.rstrip("/") else []
    if not all(SEGMENT_RE.fullmatch(p) for p in parts):
        raise InvalidArgument(f"invalid prefix in {url!r}: its parts are letters, digits and"
                              " '_', '-', '.' (not first)")
    return Location(bucket, "".join(f"{p}/" for p in parts))


def parse_snapshot_url(url: str) -> tuple[Location, str]:
    """`s3://BUCKET/PREFIX/SNAPSHOT`: one pushed snapshot (its name is the last part)."""
    location = parse_location(url)
    parts = location.prefix.rstrip("/").split("/")
    name = parts[-1]
    if url.endswith("/") or not location.prefix or not SNAPSHOT_NAME_RE.fullmatch(name):
        raise InvalidArgument(f"{url!r} names no snapshot (expected s3://BUCKET/PREFIX/SNAPSHOT,"
                              " the snapshot's name in lowercase letters, digits and '-')")
    prefix = "".join(f"{p}/" for p in parts[:-1])
    return Location(location.bucket, prefix), name
