"""How snapshot files are cut into chunks for the bucket, and the bucket's names."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from torpor.errors import InvalidArgument
from torpor.remote import chunks
from torpor.remote.location import parse_location, parse_snapshot_url

BLOCK = chunks.BLOCK


def test_block_cutting_leaves_out_holes_and_zero_chunks(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * BLOCK)  # sparse
        f.seek(3 * BLOCK + 100)
        f.write(os.urandom(BLOCK))  # straddles blocks 3 and 4
        f.seek(10 * BLOCK)
        f.write(bytes(BLOCK))  # allocated, but zeros
        f.seek(64 * BLOCK - 10)
        f.write(b"tail bytes")  # the last block, short of nothing
    pieces = list(chunks.pieces(disk, "block"))
    assert [p.offset for p in pieces] == [3 * BLOCK, 4 * BLOCK, 63 * BLOCK]
    assert all(p.length == BLOCK for p in pieces)
    assert pieces[0].digest == chunks.digest_of(disk.read_bytes()[3 * BLOCK:4 * BLOCK])


def test_stream_cutting_realigns_after_an_insertion(tmp_path: Path) -> None:
    rng = random.Random(7)
    data = rng.randbytes(24 << 20)
    before, after = tmp_path / "before", tmp_path / "after"
    before.write_bytes(data)
    after.write_bytes(data[:1 << 20] + rng.randbytes(4096) + data[1 << 20:])  # a page more
    old = {p.digest for p in chunks.pieces(before, "stream")}
    new = list(chunks.pieces(after, "stream"))
    shared = sum(p.length for p in new if p.digest in old)
    assert shared > 0.85 * len(data)  # fixed chunks would share only the first MiB
    fixed_old = {p.digest for p in chunks.pieces(before, "block")}
    assert sum(p.length for p in chunks.pieces(after, "block") if p.digest in fixed_old) \
        <= 2 << 20


def test_a_chunk_object_round_trips_and_damage_is_named(tmp_path: Path) -> None:
    for data in (os.urandom(BLOCK), b"abc" * 1000, bytes(4096)):
        body = chunks.encode(data)
        assert chunks.decode(body, len(data), chunks.digest_of(data)) == data
    data = b"guest data " * 10000
    other = chunks.encode(data.replace(b"guest", b"GUEST", 1))
    with pytest.raises(chunks.ChunkDamaged, match="does not hash to its name"):
        chunks.decode(other, len(data), chunks.digest_of(data))
    with pytest.raises(chunks.ChunkDamaged):
        chunks.decode(b"not zstd at all", len(data), chunks.digest_of(data))


@pytest.mark.parametrize(("url", "bucket", "prefix"), [
    ("s3://bucket", "bucket", ""),
    ("s3://bucket/", "bucket", ""),
    ("s3://my.bucket-1/a/b_c/", "my.bucket-1", "a/b_c/"),
])
def test_locations(url: str, bucket: str, prefix: str) -> None:
    location = parse_location(url)
    assert (location.bucket, location.prefix) == (bucket, prefix)
    assert location.chunk_key("ab" * 32) == f"{prefix}chunks/{'ab' * 32}"
    assert location.name_of(location.manifest_key("snap-1")) == "snap-1"


@pytest.mark.parametrize("url", ["http://bucket/p", "s3://Bucket/p", "s3://b/p", "s3://bucket/../p",
                                 "s3://bucket//p", "s3://bucket/.hidden"])
def test_bad_locations(url: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_location(url)


def test_snapshot_urls() -> None:
    location, name = parse_snapshot_url("s3://bucket/team/base-1")
    assert (location.prefix, name) == ("team/", "base-1")
    for url in ("s3://bucket", "s3://bucket/team/Base", "s3://bucket/team/"):
        with pytest.raises(InvalidArgument):
            parse_snapshot_url(url)
