"""Create: a new instance from a guest image, published whole or not at all."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel

from torpor.copy import copy_file
from torpor.errors import AlreadyExists, InvalidArgument, OperationFailed
from torpor.fsutil import fsync_dir, owned_name
from torpor.hypervisor.accel import AccelChoice
from torpor.hypervisor.vmconfig import PortForward
from torpor.images.builtin import GuestImage, ensure_builtin_image, recipe_hash
from torpor.images.imagedisk import (
    IMAGE_CMDLINE,
    Accounts,
    RunSpec,
    ensure_image_disk,
    render_run_config,
    resolve_run,
    write_run_config,
)
from torpor.images.oci import ImageRecord, ImageStore, normalize_reference
from torpor.images.source import OciSource
from torpor.instances.locking import file_lock
from torpor.instances.metadata import (
    DEFAULT_DISK,
    DEFAULT_MEMORY,
    CompressionPolicy,
    ImageRef,
    InstanceMetadata,
    MemoryBacking,
    NetworkMode,
    new_instance_id,
    new_mac,
    new_vmgenid,
    utc_now,
    validate_name,
)
from torpor.operations import network
from torpor.operations.registry import Registry
from torpor.paths import DataRoot, InstancePaths
from torpor.tasks import to_thread
from torpor.units import format_size

MAX_CPUS = 64


def host_memory_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


async def create(registry: Registry, name: str, *, memory_bytes: int = DEFAULT_MEMORY,
                 cpus: int = 1, disk_bytes: int = DEFAULT_DISK, image: GuestImage | None = None,
                 oci: OciSource | None = None,
                 accel: AccelChoice = "auto", port_forwards: list[PortForward] | None = None,
                 snapshot_policy: CompressionPolicy | None = None,
                 memory_backing: MemoryBacking = "anonymous",
                 network_mode: NetworkMode | None = None,
                 publish: list[str] | None = None,
                 allow_peers: bool = False) -> InstanceMetadata:
    validate_name(name)
    if memory_backing not in ("anonymous", "file"):
        raise InvalidArgument("--memory-backing must be anonymous or file")
    if not 1 <= cpus <= MAX_CPUS:
        raise InvalidArgument(f"--cpus must be between 1 and {MAX_CPUS}")
    if memory_bytes < 64 << 20 or memory_bytes % (1 << 20):
        raise InvalidArgument("--memory must be a whole number of MiB, at least 64M")
    host_memory = host_memory_bytes()
    if memory_bytes > host_memory:
        # Guests together may overcommit the host; one larger than it never starts (QEMU
        # cannot set up its RAM, or the guest's kernel exhausts the host at boot).
        raise InvalidArgument(f"--memory {format_size(memory_bytes)} is more than this "
                              f"host's {format_size(host_memory)} of RAM")
    if snapshot_policy is not None:
        snapshot_policy.effective_level()
    port_forwards = [*(port_forwards or []), *map(network.parse_publish, publish or [])]
    # Blocking work goes to threads: in the daemon, other requests keep being served.
    if image is None:
        image = await to_thread(lambda: ensure_builtin_image(quiet=True))
    prepared = await to_thread(_prepare_oci, registry, oci) if oci else None
    if prepared is not None:
        image = image.model_copy(update={"rootfs": prepared.disk, "cmdline": IMAGE_CMDLINE})
    base_size = image.rootfs.stat().st_size
    if disk_bytes < base_size:
        raise InvalidArgument(f"--disk-size must be at least the image's size, "
                              f"{format_size(base_size)} ({base_size} bytes)")
    data_root = registry.data_root
    data_root.ensure()
    async with file_lock(data_root.registry_lock, what="the instance registry"):
        if name in await to_thread(registry.instance_names):
            raise AlreadyExists(f"an instance named {name!r} already exists")
        await to_thread(network.check_publishable, port_forwards,
                                registry.all_metadata())
        instance_id = new_instance_id()
        staging = data_root.staging(owned_name(f"create-{instance_id}"))
        try:
            net = await to_thread(
                lambda: network.assign(data_root, registry.settings, instance_id, network_mode,
                                       allow_peers=allow_peers))
            staging.mkdir(parents=True)
            paths = InstancePaths(staging)
            for d in (paths.logs_dir, paths.run_dir, paths.snapshots_dir):
                d.mkdir()
            await to_thread(_make_disk, image.rootfs, paths.disk, disk_bytes)
            image_ref = await to_thread(_import_image, data_root, image)
            if prepared is not None:
                await to_thread(write_run_config, paths.disk,
                                        render_run_config(prepared.run, name))
                image_ref = image_ref.model_copy(update={
                    "kind": "oci", "reference": prepared.reference,
                    "digest": prepared.record.digest, "run": prepared.run})
            meta = InstanceMetadata(
                id=instance_id, name=name, created_at=utc_now(), cpus=cpus,
                memory_mib=memory_bytes >> 20, disk_bytes=disk_bytes, mac=new_mac(),
                image=image_ref, accel=accel,
                port_forwards=port_forwards, snapshot_policy=snapshot_policy,
                vmgenid=new_vmgenid(), memory_backing=memory_backing, network=net,
                free_page_reporting=memory_backing == "anonymous", identity_helper=True)
            final = data_root.instance(instance_id).root
            await to_thread(_publish, meta, staging, final)
        except BaseException:
            await to_thread(shutil.rmtree, staging, ignore_errors=True)
            await to_thread(network.release_owner, data_root, registry.settings,
                                    instance_id)
            raise
    return meta


class _PreparedImage(BaseModel):
    reference: str
    record: ImageRecord
    disk: Path
    run: RunSpec


def _prepare_oci(registry: Registry, oci: OciSource) -> _PreparedImage:
    """The image (pulled if torpor does not have it), its disk built, its command."""
    store = image_store(registry)
    record = store.find(oci.reference)
    if record is None:
        record = store.pull(oci.reference, insecure=oci.insecure)
    disk = ensure_image_disk(store, record)
    run = resolve_run(record, Accounts.of_disk(disk), entrypoint=oci.entrypoint, cmd=oci.cmd,
                      env=oci.env, workdir=oci.workdir, user=oci.user)
    reference = oci.reference if oci.reference.startswith("sha256:") else \
        normalize_reference(oci.reference)
    return _PreparedImage(reference=reference, record=record, disk=disk, run=run)


def image_store(registry: Registry) -> ImageStore:
    return ImageStore(registry.data_root)


def _import_image(data_root: DataRoot, image: GuestImage) -> ImageRef:
    """Copy the image's boot files into the data root once, so instances do not depend on
    a cache that a recipe change replaces."""
    target = data_root.image_dir(f"{image.name}-{recipe_hash()}")
    if not target.exists():
        staging = data_root.staging(owned_name(f"image-{target.name}"))
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for f in (image.kernel, image.initrd):
            if f is not None:
                copy_file(f, staging / f.name, fsync=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.exists():  # only losing a race to another creator is fine
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return ImageRef(name=image.name, kernel=target / image.kernel.name,
                    initrd=target / image.initrd.name if image.initrd else None,
                    cmdline=image.cmdline)


def _publish(meta: InstanceMetadata, staging: Path, final: Path) -> None:
    """The metadata written (fsync), then the instance renamed into place: it appears
    whole or not at all."""
    meta.save(InstancePaths(staging).metadata)
    os.rename(staging, final)
    fsync_dir(final.parent)


def _make_disk(rootfs: Path, disk: Path, size: int) -> None:
    copy_file(rootfs, disk)
    if size > disk.stat().st_size:
        try:
            os.truncate(disk, size)
        except OSError as exc:  # e.g. EFBIG: past the filesystem's largest file
            raise InvalidArgument(f"--disk-size {format_size(size)}: {exc.strerror} "
                                  f"(on the data root's filesystem)") from None
        result = subprocess.run(["resize2fs", "-f", str(disk)], capture_output=True,
                                check=False)
        if result.returncode != 0:
            raise OperationFailed("resize2fs failed: " + result.stderr.decode()[-500:])
    with open(disk, "rb+") as f:
        os.fsync(f.fileno())
