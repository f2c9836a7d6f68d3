"""Stored snapshots in S3-compatible object storage: push, pull, list, delete.

A push sends a stored snapshot's payload (disk, RAM file, machine state, metadata) and
the boot files its instance uses as content-addressed chunks (remote/), then its
manifest: a snapshot is in the bucket once its manifest is. A pull checks the manifest
against this host before it downloads anything, builds the snapshot in a staging
directory (every chunk checked against its hash, the machine state against its
checksum, the RAM file against its sampled pages) and renames it into place: nothing is
visible until it is whole.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import get_args

from pydantic import BaseModel

from torpor import faults
from torpor.codec import checksum_file
from torpor.errors import (
    AlreadyExists,
    IntegrityError,
    NotFound,
    OperationFailed,
    Unsupported,
)
from torpor.fsutil import (
    OWNER_SEPARATOR,
    atomic_write_json,
    fsync_dir,
    fsync_tree,
    owned_name,
)
from torpor.hypervisor.accel import kvm_device_usable
from torpor.hypervisor.vmconfig import DEFAULT_CPU_MODEL, MACHINE_TYPE
from torpor.instances import observe
from torpor.instances.context import Settings
from torpor.instances.metadata import InstanceMetadata, MemoryBacking, utc_now
from torpor.instances.snapshotrecord import (
    SnapshotRecord,
    all_records,
    save_record,
    validate_snapshot_name,
    validate_tags,
)
from torpor.machinestate.manifest import MACHINE_STATE, Manifest, rebind_memory_file
from torpor.operations import snapshots
from torpor.operations.health import owner_alive
from torpor.paths import SNAPSHOT_STAGING_PREFIX, DataRoot, InstancePaths, SnapshotPaths
from torpor.remote import chunks, locks, transfer
from torpor.remote.location import Location, parse_location, parse_snapshot_url
from torpor.remote.manifest import BootFiles, HostNeeds, RemoteSnapshot
from torpor.remote.store import NoSuchObject, ObjectStore
from torpor.tasks import in_thread

log = logging.getLogger(__name__)

PULLED_FROM_TAG = "torpor.pulled-from"
BOOT = "boot"  # the boot files' directory inside a pushed snapshot


class PushReport(BaseModel):
    """What `snapshot push --json` prints."""

    url: str
    uploaded_bytes: int
    total_bytes: int
    chunks: int
    skipped_chunks: int
    seconds: float


class RemoteSnapshotInfo(BaseModel):
    name: str
    url: str
    source_name: str
    kind: str
    created_at: datetime
    pushed_at: datetime
    stored_bytes: int  # the chunks' data bytes (before compression; shared ones counted)
    chunks: int
    qemu_version: str | None


class RemoteDeleteReport(BaseModel):
    removed_chunks: int
    kept_chunks: int  # still referenced by another snapshot's manifest


# --- push -----------------------------------------------------------------------------------

def _payload_files(payload: InstancePaths) -> list[transfer.LocalFile]:
    """Every file of the payload; machine states are cut as streams, the rest in blocks."""
    return [transfer.LocalFile(source=path, path=path.relative_to(payload.root).as_posix(),
                               cutting="stream" if path.name.startswith(MACHINE_STATE)
                               else "block")
            for path in transfer.iter_files(payload.root)]


def _boot_files(data_root: DataRoot, meta: InstanceMetadata) -> tuple[str, list[Path]] | None:
    """The image directory (under the data root) the instance boots from, and its files."""
    files = [p for p in (meta.image.kernel, meta.image.initrd) if p is not None]
    directory = files[0].parent
    if directory.parent != data_root.images_dir or any(p.parent != directory for p in files):
        return None  # not torpor's own copy: the puller must have the same path
    return directory.name, files


def host_needs(payload: InstancePaths, meta: InstanceMetadata) -> HostNeeds:
    """What a host must offer to load this payload: its machine state's QEMU, accelerator,
    machine and CPU (a stopped snapshot's only the machine and CPU it boots with)."""
    if not payload.standby_dir.exists():
        return HostNeeds(qemu_version=None, accel=None, machine=MACHINE_TYPE,
                         cpu_model=DEFAULT_CPU_MODEL, memory_backing=meta.memory_backing)
    manifest = Manifest.load(payload.standby_dir)
    config = manifest.vm_config
    return HostNeeds(qemu_version=manifest.qemu_version, accel=config.accel,
                     machine=config.machine, cpu_model=config.cpu_model,
                     memory_backing="file" if manifest.kind == "memory-file"
                     or config.memory_file is not None else "anonymous")


def _push_blocking(data_root: DataRoot, record: SnapshotRecord, location: Location,
                   remote_name: str, stop: threading.Event) -> PushReport:
    payload = data_root.snapshot(record.id).payload_instance()
    meta = InstanceMetadata.load(payload.metadata)
    if meta.memory_origin is not None:
        raise Unsupported(f"snapshot {record.name} maps another snapshot's RAM file"
                          f" ({meta.memory_origin}); push that snapshot instead")
    needs = host_needs(payload, meta)
    store = ObjectStore(location.bucket)
    _refuse_other_snapshot(store, location, remote_name, record)
    files = _payload_files(payload)
    boot = _boot_files(data_root, meta)
    if boot is not None:
        _, paths = boot
        files += [transfer.LocalFile(source=p, path=f"{BOOT}/{p.name}", cutting="block")
                  for p in paths]
    progress = observe.counter("upload", sum(f.source.stat().st_blocks * 512 for f in files))
    # From before the first chunk is found present to the manifest naming it: no delete.
    with locks.held(store, location, "push"):
        faults.point("push.locked")
        remote_files, stats = transfer.upload(store, location, files, progress, stop=stop)
        payload_count = len(files) - (len(boot[1]) if boot else 0)  # boot files come last
        manifest = RemoteSnapshot(
            name=remote_name, pushed_at=utc_now(), record=record.model_dump(mode="json"),
            needs=needs, files=remote_files[:payload_count],
            boot=(BootFiles(directory=boot[0], files=remote_files[payload_count:]) if boot
                  else None))
        store.put(location.manifest_key(remote_name), manifest.encode())  # now it exists
    return PushReport(url=location.snapshot_url(remote_name), **stats.as_dict())


def _refuse_other_snapshot(store: ObjectStore, location: Location, name: str,
                           record: SnapshotRecord) -> None:
    """Pushing the same snapshot again completes (or repeats) it; a different one under
    the same name is refused, never overwritten."""
    try:
        body = store.get(location.manifest_key(name))
    except NoSuchObject:
        return
    there = RemoteSnapshot.decode(body, location.snapshot_url(name))
    if there.record.get("id") != record.id:
        raise AlreadyExists(f"{location.snapshot_url(name)} holds another snapshot (of"
                            f" {there.record.get('source_name')}); remote-delete it first or"
                            " push under another --name")


async def push(data_root: DataRoot, settings: Settings, record: SnapshotRecord, url: str,
               remote_name: str | None, mapped: Callable[[], bool]) -> PushReport:
    location = parse_location(url)
    name = validate_snapshot_name(remote_name or record.name)
    # Held while reading: a background job would replace the state under the upload.
    async with snapshots.reading(settings, data_root, record.id, mapped):
        return await in_thread(lambda stop: _push_blocking(data_root, record, location, name,
                                                           stop))


# --- pull -----------------------------------------------------------------------------------

def _qemu_says(binary: str, *args: str) -> str:
    try:
        return subprocess.run([binary, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise OperationFailed(f"cannot run {binary} {' '.join(args)}: {exc}") from None


def installed_qemu_version(binary: str) -> str:
    """major.minor.micro, as QEMU's monitor reports it (query-version)."""
    out = _qemu_says(binary, "--version")
    found = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
    if found is None:
        raise OperationFailed(f"unexpected output of {binary} --version: {out.strip()[:200]}")
    return ".".join(found.groups())


def check_host(needs: HostNeeds, settings: Settings, what: str) -> None:
    """Unsupported, with the reason, unless this host can load the snapshot."""
    binary = settings.qemu_binary
    if needs.memory_backing not in get_args(MemoryBacking):
        raise Unsupported(f"{what} needs memory backing {needs.memory_backing!r}; this torpor"
                          f" knows {', '.join(get_args(MemoryBacking))}")
    if needs.qemu_version is not None:
        here = installed_qemu_version(binary)
        if here != needs.qemu_version:
            raise Unsupported(f"{what} was saved by QEMU {needs.qemu_version}; this host has"
                              f" {here}, which cannot load its machine state")
    if needs.accel == "kvm" and (settings.accel == "tcg" or not kvm_device_usable()):
        raise Unsupported(f"{what} was saved under KVM; this host cannot run KVM guests"
                          " (a machine state does not move between KVM and TCG)")
    machines = _qemu_says(binary, "-machine", "help")
    if not re.search(rf"^{re.escape(needs.machine)}\s", machines, re.M):
        raise Unsupported(f"{what} needs machine type {needs.machine}, which {binary} lacks")
    if not re.search(rf"\b{re.escape(needs.cpu_model)}\b", _qemu_says(binary, "-cpu", "help")):
        raise Unsupported(f"{what} needs CPU model {needs.cpu_model}, which {binary} lacks")


def fetch_manifest(store: ObjectStore, location: Location, name: str) -> RemoteSnapshot:
    url = location.snapshot_url(name)
    try:
        body = store.get(location.manifest_key(name))
    except NoSuchObject:
        raise NotFound(f"no snapshot {name!r} in {location}") from None
    return RemoteSnapshot.decode(body, url)


def _install_boot(store: ObjectStore, location: Location, data_root: DataRoot,
                  boot: BootFiles, stop: threading.Event) -> Path:
    """The snapshot's image directory here: the one this host has (if its files are the
    same), or downloaded and renamed into place."""
    target = data_root.image_dir(boot.directory)
    if target.exists():
        for remote in boot.files:
            local = target / remote.path.removeprefix(f"{BOOT}/")
            have = [(p.offset, p.digest) for p in chunks.pieces(local, "block")] \
                if local.exists() else None
            if have != [(c.offset, c.digest) for c in remote.chunks]:
                raise IntegrityError(f"this host's image {boot.directory} differs from the"
                                     f" snapshot's ({local.name})")
        return target
    staging = data_root.staging(owned_name(f"image-{boot.directory}"))
    shutil.rmtree(staging, ignore_errors=True)
    try:
        transfer.download(store, location, boot.files, staging, stop=stop)
        fsync_tree(staging)
        (staging / BOOT).rename(target)
    except OSError:
        if not target.exists():  # only losing a race to another puller is fine
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _rebind_boot(payload: InstancePaths, image_dir: Path) -> None:
    meta = InstanceMetadata.load(payload.metadata)
    image = meta.image
    meta.image = image.model_copy(update={
        "kernel": image_dir / image.kernel.name,
        "initrd": image_dir / image.initrd.name if image.initrd else None})
    meta.save(payload.metadata)


def _verify_state(payload: InstancePaths) -> None:
    """The machine state's own checksum, and the RAM file's sampled pages (re-recorded as
    this copy's, as after any copy torpor makes)."""
    if not payload.standby_dir.exists():
        return
    manifest = Manifest.load(payload.standby_dir)
    stored = payload.standby_dir / manifest.state.stored_name()
    if manifest.state.checksum is not None:
        found = checksum_file(stored).checksum
        if found != manifest.state.checksum:
            raise IntegrityError(f"the pulled machine state does not match its checksum"
                                 f" ({found} != {manifest.state.checksum})")
    rebind_memory_file(payload.standby_dir, payload.memory_file)


class PullMark(BaseModel):
    """In a pull's staging directory: which remote snapshot it is downloading, so that a
    pull of the same one after it failed or was killed resumes it."""

    url: str
    manifest: str  # sha256 of the manifest: the same name re-pushed is another snapshot


def _adopt_partial(data_root: DataRoot, mark: PullMark, staging: SnapshotPaths) -> bool:
    """A staging directory of an earlier pull of the same snapshot whose process is gone
    (killed, or failed and let go of it), renamed into this pull's. False if none."""
    if not data_root.snapshots_dir.is_dir():
        return False
    for entry in sorted(data_root.snapshots_dir.glob(f"{SNAPSHOT_STAGING_PREFIX}*")):
        if owner_alive(entry.name) or _mark_of(entry) != mark:
            continue
        try:
            os.rename(entry, staging.root)  # atomic: of two pulls, one takes it
        except FileNotFoundError:
            continue
        fsync_dir(data_root.snapshots_dir)
        return True
    return False


def _mark_of(staging_root: Path) -> PullMark | None:
    try:
        return PullMark.model_validate_json(SnapshotPaths(staging_root).pull_mark.read_bytes())
    except (OSError, ValueError):
        return None


def _let_go(staging: SnapshotPaths) -> None:
    """A failed pull's staging directory, renamed without its owner's tag: the next pull
    of the same snapshot resumes it; `torpor check --repair` removes it."""
    name, _, _ = staging.root.name.rpartition(OWNER_SEPARATOR)
    os.rename(staging.root, staging.root.with_name(name))
    fsync_dir(staging.root.parent)


def _pull_blocking(data_root: DataRoot, settings: Settings, url: str, local_name: str | None,
                   stop: threading.Event) -> SnapshotRecord:
    location, name = parse_snapshot_url(url)
    store = ObjectStore(location.bucket)
    remote = fetch_manifest(store, location, name)
    check_host(remote.needs, settings, f"snapshot {url}")
    data_root.ensure()
    try:
        pushed = SnapshotRecord.model_validate(remote.record)
    except ValueError as exc:
        raise IntegrityError(f"{url}: the manifest's record is invalid: {exc}") from None
    snapshot_name = validate_snapshot_name(local_name or name)
    if any(r.name == snapshot_name and r.source_id == pushed.source_id
           for r in all_records(data_root)):
        raise AlreadyExists(f"a snapshot named {snapshot_name!r} of {pushed.source_name}"
                            " exists here; pull it under another --name")
    snapshot_id = secrets.token_hex(6)
    staging = data_root.snapshot_staging(owned_name(snapshot_id))
    final = data_root.snapshot(snapshot_id).root
    mark = PullMark(url=url, manifest=hashlib.sha256(remote.encode()).hexdigest())
    resumed = _adopt_partial(data_root, mark, staging)
    if not resumed:
        staging.root.mkdir()
        atomic_write_json(staging.pull_mark, mark.model_dump(mode="json"))
    try:
        image_dir = _install_boot(store, location, data_root, remote.boot, stop) \
            if remote.boot else None
        payload = staging.payload_instance()
        progress = observe.counter("download", sum(f.stored_bytes() for f in remote.files))
        found = transfer.download(store, location, remote.files, payload.root, progress,
                                  stop=stop, resume=resumed)
        if found:
            log.info("pull of %s resumed: %d chunks were here already", url, found)
        if image_dir is not None:
            _rebind_boot(payload, image_dir)
        _verify_state(payload)
        faults.point("pull.downloaded")
        tags = validate_tags({**pushed.tags, PULLED_FROM_TAG: url[:256]})
        record = pushed.model_copy(update={"id": snapshot_id, "name": snapshot_name,
                                           "tags": tags, "compression_plan": None})
        staging.pull_mark.unlink()
        fsync_tree(staging.root)
        save_record(staging, record)
        snapshots.publish(staging, final)
    except BaseException as exc:
        # What was downloaded stays for the next pull, unless it cannot be trusted (or
        # the pull had got past it: no mark, nothing a next pull would take up).
        if (isinstance(exc, IntegrityError) or final.exists()
                or not staging.pull_mark.exists()):
            snapshots.discard(staging, final)
        else:
            _let_go(staging)
        raise
    return record


async def pull(data_root: DataRoot, settings: Settings, url: str,
               local_name: str | None) -> SnapshotRecord:
    return await in_thread(lambda stop: _pull_blocking(data_root, settings, url, local_name,
                                                       stop))


# --- list and delete ------------------------------------------------------------------------

def _manifests(store: ObjectStore, location: Location) -> list[RemoteSnapshot]:
    found = []
    for key in store.keys(location.manifests_prefix):
        name = location.name_of(key)
        if name is not None:
            found.append(fetch_manifest(store, location, name))
    return found


def _info(location: Location, remote: RemoteSnapshot) -> RemoteSnapshotInfo:
    record = remote.record
    return RemoteSnapshotInfo(
        name=remote.name, url=location.snapshot_url(remote.name),
        source_name=str(record.get("source_name", "")), kind=str(record.get("kind", "")),
        created_at=record.get("created_at", remote.pushed_at), pushed_at=remote.pushed_at,
        stored_bytes=sum(f.stored_bytes() for f in remote.all_files()),
        chunks=sum(len(f.chunks) for f in remote.all_files()),
        qemu_version=remote.needs.qemu_version)


async def remote_list(url: str) -> list[RemoteSnapshotInfo]:
    location = parse_location(url)

    def listing() -> list[RemoteSnapshotInfo]:
        store = ObjectStore(location.bucket)
        return sorted((_info(location, m) for m in _manifests(store, location)),
                      key=lambda i: i.pushed_at)

    return await in_thread(lambda _: listing())


def _delete_blocking(url: str) -> RemoteDeleteReport:
    """The manifest first (the snapshot is gone from then on), then each of its chunks
    that no other manifest under the prefix references. Never while a push to the prefix
    runs (remote/locks.py): it may have found one of those chunks there and skipped it."""
    location, name = parse_snapshot_url(url)
    store = ObjectStore(location.bucket)
    doomed = fetch_manifest(store, location, name).digests()
    with locks.held(store, location, "delete"):
        faults.point("remote-delete.locked")
        store.delete([location.manifest_key(name)])
        still_used: set[str] = set()
        for other in _manifests(store, location):
            still_used |= other.digests()
        removed = sorted(doomed - still_used)
        store.delete([location.chunk_key(d) for d in removed])
    return RemoteDeleteReport(removed_chunks=len(removed), kept_chunks=len(doomed) - len(removed))


async def remote_delete(url: str) -> RemoteDeleteReport:
    return await in_thread(lambda _: _delete_blocking(url))

