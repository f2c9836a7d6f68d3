"""Images: pull, import, list and remove OCI images (images/oci.py does the work; this
module adds what only the instance registry knows: which instances use an image)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel

from torpor.images.imagedisk import carry_hash
from torpor.images.oci import ImageConfig, ImageRecord, ImageStore
from torpor.operations.registry import Registry
from torpor.tasks import to_thread

Progress = Callable[[int, int], None]


class ImageInfo(BaseModel):
    """What `image list` reports."""

    references: list[str]
    digest: str
    size: int  # its layers, compressed
    created: str | None = None
    added_at: datetime
    config: ImageConfig
    disk_built: bool  # its VM disk is cached: creating an instance copies (reflinks) it
    used_by: list[str]  # instance names


def store(registry: Registry) -> ImageStore:
    return ImageStore(registry.data_root)


def users(registry: Registry, digest: str) -> list[str]:
    return sorted(meta.name for meta in registry.all_metadata()
                  if meta.image.kind == "oci" and meta.image.digest == digest)


def describe(registry: Registry, record: ImageRecord) -> ImageInfo:
    disk = registry.data_root.image_disk(record.hex, carry_hash())
    return ImageInfo(references=record.references, digest=record.digest, size=record.size,
                     created=record.created, added_at=record.added_at, config=record.config,
                     disk_built=disk.exists(), used_by=users(registry, record.digest))


async def pull(registry: Registry, ref: str, *, insecure: bool = False,
               progress: Progress | None = None) -> ImageInfo:
    record = await to_thread(
        lambda: store(registry).pull(ref, insecure=insecure, progress=progress))
    return describe(registry, record)


async def import_archive(registry: Registry, path: Path,
                         reference: str | None = None) -> ImageInfo:
    record = await to_thread(
        lambda: store(registry).import_archive(path, reference))
    return describe(registry, record)


async def list_images(registry: Registry) -> list[ImageInfo]:
    def collect() -> list[ImageInfo]:
        return [describe(registry, r) for r in store(registry).records()]
    return await to_thread(collect)


async def remove(registry: Registry, ref: str) -> None:
    def drop() -> None:
        images = store(registry)
        record = images.get(ref)
        images.remove(ref, users(registry, record.digest))
    await to_thread(drop)
