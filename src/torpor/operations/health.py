"""What a healthy data root looks like, and what is wrong with one: `torpor check`.

`scan` walks a data root and names every inconsistency it knows, read-only. `repair`
fixes what is safe: debris whose owner process is gone, and per instance whatever
recovery (operations/recover.py) does under the instance's lock; then it scans again and
marks each problem repaired or not. The fault-matrix tests use the same scan as their
invariant: after any fault and the next command, it must come back empty.

Debris is recognised by its owner: temporary names end in `@<pid>-<start time>` of the
process that made them (fsutil.owned_name), so a sweep never touches work in progress.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel

from torpor.codec import SUFFIXES
from torpor.errors import Busy, IntegrityError, NotFound, TorporError
from torpor.fsutil import DELETING_PREFIX, parse_owner, read_json, remove_tree
from torpor.hypervisor.process import ProcessIdentity, TrackedProcess
from torpor.hypervisor.qmp import PAUSED_STATES
from torpor.instances.metadata import InstanceMetadata, InstanceState
from torpor.instances.runtime import load_runtime, query_vm_status
from torpor.instances.snapshotrecord import all_records
from torpor.instances.states import Action
from torpor.jobs import compression as compression_jobs
from torpor.machinestate.manifest import Manifest, locate_state_file
from torpor.network import dns, firewall, host
from torpor.operations import lifecycle, network, warm
from torpor.operations.registry import Registry
from torpor.operations.snapshots import AUTO_TAG, OWNER_TAG
from torpor.paths import SNAPSHOT_STAGING_PREFIX, DataRoot, InstancePaths, SnapshotPaths
from torpor.tasks import to_thread

TMP_SUFFIX = ".tmp"


class Kind(StrEnum):
    # debris of a dead process, anywhere in the data root: removed
    STAGING = "staging"
    PARTIAL_SNAPSHOT = "partial-snapshot"
    DELETING = "deleting"
    ORPHANED_JOB = "orphaned-job"
    ORPHANED_LOCK = "orphaned-lock"
    ORPHANED_SNAPSHOT = "orphaned-snapshot"
    STRAY_QEMU = "stray-qemu"  # killed
    ORPHANED_ADDRESS = "orphaned-address"  # released, with its TAP
    ORPHANED_TAP = "orphaned-tap"  # a TAP on the bridge that no instance has: removed
    BRIDGE_SERVICES = "bridge-services"  # the bridge lacks its rules or its DNS: put back
    IDLE_BRIDGE = "idle-bridge"  # a bridge with no address leased: removed
    # one instance's, put right under its lock (recovery, then what recovery leaves)
    PAUSED_VM = "paused-vm"
    STALE_STATE = "stale-state"
    CRASHED = "crashed"
    PARTIAL_STANDBY = "partial-standby"
    DISK_OVERLAY = "disk-overlay"
    STALE_TEMP = "stale-temp"
    ORPHANED_PLAN = "orphaned-plan"
    # reported, never repaired: damage is kept for whoever wants to look at it
    BAD_METADATA = "bad-metadata"
    BAD_MANIFEST = "bad-manifest"
    MISSING_STATE = "missing-state"
    STATE_SIZE = "state-size"
    MISSING_ORIGIN = "missing-origin"
    MISSING_DISK = "missing-disk"
    UNRESPONSIVE = "unresponsive"  # a hung QEMU: killing the VM is its user's call (`stop`)


DEBRIS = {Kind.STAGING, Kind.PARTIAL_SNAPSHOT, Kind.DELETING, Kind.ORPHANED_JOB,
          Kind.ORPHANED_LOCK, Kind.ORPHANED_SNAPSHOT}
PER_INSTANCE = {Kind.PAUSED_VM, Kind.STALE_STATE, Kind.CRASHED, Kind.PARTIAL_STANDBY,
                Kind.DISK_OVERLAY, Kind.STALE_TEMP, Kind.ORPHANED_PLAN}


class Problem(BaseModel):
    kind: Kind
    path: str
    detail: str
    repaired: bool = False


def owner_alive(name: str) -> bool:
    """Whether the process named in `name`'s owner tag still runs (untagged: no)."""
    owner = parse_owner(name)
    return owner is not None and ProcessIdentity(pid=owner[0], start_time=owner[1]).is_alive()


# --- scan ------------------------------------------------------------------------------

def _debris(root: DataRoot) -> Iterator[Problem]:
    """Staging and deletion leftovers of dead processes, across the data root."""
    places = [(root.tmp_dir, "", Kind.STAGING, "a build (instance, fork, image) never finished")]
    places.append((root.snapshots_dir, SNAPSHOT_STAGING_PREFIX, Kind.PARTIAL_SNAPSHOT,
                   "a snapshot never published"))
    # Removals rename aside first: at the top (instances, snapshots) and inside each
    # instance (its standby states: .deleting-latest@…).
    inside = sorted(root.instances_dir.glob("*/snapshots")) if root.instances_dir.is_dir() else []
    for directory in (root.instances_dir, root.snapshots_dir, *inside):
        places.append((directory, DELETING_PREFIX, Kind.DELETING, "a removal never finished"))
    for directory, prefix, kind, detail in places:
        if not directory.is_dir():
            continue
        for entry in sorted(directory.iterdir()):
            if entry.name.startswith(prefix) and not owner_alive(entry.name):
                yield Problem(kind=kind, path=str(entry), detail=_partial_pull(entry) or detail)


def _partial_pull(staging: Path) -> str | None:
    """What a snapshot staging directory left by a pull says (operations/remote.py)."""
    try:
        url = read_json(SnapshotPaths(staging).pull_mark)["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return f"a pull of {url} that did not finish: pulling it again resumes it"


def present_ids(root: DataRoot) -> set[str]:
    """The ids of the instance directories there, readable metadata or not."""
    if not root.instances_dir.is_dir():
        return set()
    return {entry.name for entry in root.instances_dir.iterdir()
            if not entry.name.startswith(".")}


def _instances(root: DataRoot) -> Iterator[tuple[InstanceMetadata | None, InstancePaths]]:
    for instance_id in sorted(present_ids(root)):
        paths = root.instance(instance_id)
        try:
            yield InstanceMetadata.load(paths.metadata), paths
        except (FileNotFoundError, ValueError):
            yield None, paths


def lock_held(path: Path) -> bool:
    """Whether some process holds a flock on `path`, read from /proc/locks: probing by
    taking the lock would make a racing operation (the daemon never waits) fail busy."""
    try:
        st = path.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return False
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(line.split()[5:6] == [device] for line in table.splitlines()
               if " FLOCK " in line and "->" not in line)


async def _instance_problems(root: DataRoot, meta: InstanceMetadata | None,
                             paths: InstancePaths) -> list[Problem]:
    if meta is None:
        return [Problem(kind=Kind.BAD_METADATA, path=str(paths.metadata),
                        detail="missing or unreadable: the instance is not listed")]
    if lock_held(root.instance_lock(meta.id)):
        return []  # an operation is under way: what looks half-done is its work
    found: list[Problem] = []

    def add(kind: Kind, path: Path, detail: str) -> None:
        found.append(Problem(kind=kind, path=str(path), detail=f"{meta.name}: {detail}"))

    record = load_runtime(paths)
    alive = record is not None and record.identity.is_alive()
    standby = paths.standby_dir.exists()
    if alive:
        status = await query_vm_status(paths)
        if status in PAUSED_STATES:
            add(Kind.PAUSED_VM, paths.root, f"QEMU is {status}, left by an interrupted operation")
        elif status == "running" and standby:
            add(Kind.STALE_STATE, paths.standby_dir, "a saved state the running VM moved on from")
        elif status is None and not standby and record is not None:
            add(Kind.UNRESPONSIVE, paths.runtime,
                f"QEMU (pid {record.identity.pid}) does not answer its monitor:"
                f" `torpor stop {meta.name}` kills it")
    elif record is not None and not standby:
        add(Kind.CRASHED, paths.runtime, "QEMU died behind torpor's back")
    for leftover in (paths.standby_partial_dir, paths.standby_consumed_dir):
        if leftover.exists():
            add(Kind.PARTIAL_STANDBY, leftover, "an interrupted standby's or restore's state")
    if paths.disk_overlay.exists():
        add(Kind.DISK_OVERLAY, paths.disk_overlay, "a snapshot's disk freeze was not folded back")
    key = compression_jobs.instance_job_key(meta.id)
    worker = compression_jobs.job_running(root, key)
    if not worker:
        for directory in (paths.root, paths.standby_dir):
            for tmp in sorted(directory.glob(f"*{TMP_SUFFIX}")) if directory.is_dir() else []:
                add(Kind.STALE_TEMP, tmp, "a temporary file whose writer is gone")
    plan = meta.compression_plan
    if plan is not None and not plan.error and not worker:
        add(Kind.ORPHANED_PLAN, paths.metadata, "a background compression with no worker")
    if standby and not alive:
        found += [Problem(kind=p.kind, path=p.path, detail=f"{meta.name}: {p.detail}")
                  for p in _state_problems(paths, meta.memory_origin)]
    if meta.memory_origin is not None and not meta.memory_origin.exists():
        add(Kind.MISSING_ORIGIN, meta.memory_origin, "the snapshot RAM file this fork maps is gone")
    if not paths.disk.exists():
        add(Kind.MISSING_DISK, paths.disk, "the disk is gone: nothing can start or restore it")
    return found


def _state_problems(paths: InstancePaths, memory_origin: Path | None) -> Iterator[Problem]:
    """A saved state whose manifest does not match its files (never repaired: the
    state is refused by restore and kept for whoever wants to look at it). A fork that
    maps a base's RAM file (`memory_origin`) has none of its own: MISSING_ORIGIN covers it."""
    try:
        manifest = Manifest.load(paths.standby_dir)
    except TorporError as exc:
        yield Problem(kind=Kind.BAD_MANIFEST, path=str(paths.standby_dir), detail=str(exc))
        return
    named = paths.standby_dir / manifest.state.stored_name()
    try:
        locate_state_file(paths.standby_dir, manifest.state)  # restore's own lookup
    except IntegrityError as exc:
        yield Problem(kind=Kind.MISSING_STATE, path=str(named), detail=str(exc))
    else:
        if manifest.state.checksum and named.stat().st_size != manifest.state.stored_bytes:
            yield Problem(kind=Kind.STATE_SIZE, path=str(named),
                          detail=f"{named.stat().st_size} bytes, the manifest says"
                                 f" {manifest.state.stored_bytes}")
    memory = manifest.memory_file
    if memory is not None and memory_origin is None:
        stored = paths.memory_file.with_name(memory.name + SUFFIXES.get(memory.codec, ""))
        if not stored.exists():
            yield Problem(kind=Kind.MISSING_STATE, path=str(stored), detail="the RAM file is gone")


def _snapshot_problems(root: DataRoot, dependents: dict[str, list[str]]) -> Iterator[Problem]:
    for record in all_records(root):
        owner = record.tags.get(OWNER_TAG)
        if (record.tags.get(AUTO_TAG) and not dependents.get(record.id)
                and not (owner and owner_alive(f"@{owner}"))):
            yield Problem(kind=Kind.ORPHANED_SNAPSHOT, path=str(root.snapshot(record.id).root),
                          detail=f"{record.name}: made for forks that never came to be")


def _job_problems(root: DataRoot, ids: set[str], snapshot_ids: set[str]
                  ) -> Iterator[Problem]:
    if not root.jobs_dir.is_dir():
        return
    Subject = compression_jobs.Subject
    for kind, owners, prefix in (("instance", ids, Subject.instance("").key),
                                 ("snapshot", snapshot_ids, Subject.snapshot("").key)):
        for path in sorted(root.jobs_dir.glob(f"{prefix}*")):
            key = path.name.split(".")[0]
            if key.removeprefix(prefix) not in owners and \
                    not compression_jobs.job_running(root, key):
                yield Problem(kind=Kind.ORPHANED_JOB, path=str(path),
                              detail=f"of a deleted {kind}")


def _lock_problems(root: DataRoot, ids: set[str], snapshot_ids: set[str]) -> Iterator[Problem]:
    if not root.locks_dir.is_dir():
        return
    for path in sorted(root.locks_dir.glob("*.lock")):
        stem = path.name.removesuffix(".lock")
        snapshot_id = stem.removeprefix("snapshot-")
        if _is_id(stem) and stem not in ids:
            yield Problem(kind=Kind.ORPHANED_LOCK, path=str(path), detail="of a deleted instance")
        elif stem != snapshot_id and _is_id(snapshot_id) and snapshot_id not in snapshot_ids:
            yield Problem(kind=Kind.ORPHANED_LOCK, path=str(path), detail="of a deleted snapshot")


def _is_id(text: str) -> bool:
    return len(text) == 12 and all(c in "0123456789abcdef" for c in text)


def stray_qemus(root: DataRoot) -> Iterator[tuple[ProcessIdentity, str]]:
    """QEMU processes of this data root that no instance's runtime record names, and no
    live daemon's restore pool (operations/warm.py)."""
    marker = f"{root.instances_dir}/"
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
            if not argv or b"qemu-system" not in argv[0]:
                continue
            text = " ".join(a.decode(errors="replace") for a in argv)
            if marker not in text:
                continue
            instance_id = text.split(marker, 1)[1].split("/", 1)[0]
            paths = root.instance(instance_id)
            record = load_runtime(paths)
            identity = ProcessIdentity.of(int(pid_dir.name))
            waiting = warm.owned_alive(paths)  # a restore pool's, its daemon alive
            if identity is not None and identity.is_alive() and (
                    record is None or record.identity != identity) and (
                    waiting is None or waiting.identity != identity):
                yield identity, instance_id


async def scan(root: DataRoot, bridge: str | None = None) -> list[Problem]:
    """Every problem of the data root; with `bridge` (the configured one), of its host
    side too."""
    problems = list(_debris(root))
    metas: list[InstanceMetadata] = []
    present: set[str] = set()  # every instance directory, its metadata readable or not
    for meta, paths in _instances(root):
        present.add(paths.root.name)
        problems += await _instance_problems(root, meta, paths)
        if meta is not None:
            metas.append(meta)
    dependents: dict[str, list[str]] = {}
    for meta in metas:
        for snapshot_id in _snapshots_used(root, meta):
            dependents.setdefault(snapshot_id, []).append(meta.name)
    problems += _snapshot_problems(root, dependents)
    snapshot_ids = {r.id for r in all_records(root)}
    # An instance whose metadata is unreadable is damaged, not gone: its lock, jobs,
    # address and TAP are still its own (bad-metadata is reported, never repaired).
    problems += _job_problems(root, present, snapshot_ids)
    problems += _lock_problems(root, present, snapshot_ids)
    problems += _address_problems(root, present)
    if bridge is not None:
        problems += _bridge_problems(root, bridge, present)
    problems += [Problem(kind=Kind.STRAY_QEMU, path=str(root.instance(instance_id).root),
                         detail=f"QEMU pid {identity.pid} is no instance's")
                 for identity, instance_id in stray_qemus(root)]
    return problems


def _address_problems(root: DataRoot, ids: set[str]) -> Iterator[Problem]:
    """Addresses leased to instances that are gone (a delete killed before it released)."""
    try:
        leases: dict[str, str] = read_json(root.network_leases)
    except (OSError, ValueError):
        return
    for address, owner in sorted(leases.items()):
        if owner not in ids:
            yield Problem(kind=Kind.ORPHANED_ADDRESS, path=f"{root.network_leases}:{address}",
                          detail=f"leased to deleted instance {owner}")


def _bridge_problems(root: DataRoot, bridge: str, present: set[str]) -> Iterator[Problem]:
    """The host side of the bridge against the data root: read from sysfs, nft and the
    DNS pid file only when the bridge exists (a host without bridged instances pays
    nothing)."""
    if not host.link_exists(bridge):
        return
    for port in network.orphaned_taps(bridge, present):
        yield Problem(kind=Kind.ORPHANED_TAP, path=f"net:{port}",
                      detail=f"TAP {port} on {bridge} is no instance's")
    try:
        leased = bool(read_json(root.network_leases))
    except (OSError, ValueError):
        leased = False
    if not leased:
        yield Problem(kind=Kind.IDLE_BRIDGE, path=f"net:{bridge}",
                      detail=f"bridge {bridge} is up with no bridged instance")
        return
    missing = [what for what, ok in (
        ("its rules", firewall.present(bridge)),
        ("its DNS", dns.pid(root.dns_pid_file(bridge)) is not None)) if not ok]
    if missing:
        yield Problem(kind=Kind.BRIDGE_SERVICES, path=f"net:{bridge}",
                      detail=f"bridge {bridge} lacks {' and '.join(missing)}")


def _snapshots_used(root: DataRoot, meta: InstanceMetadata) -> Iterator[str]:
    if meta.origin_snapshot:
        yield meta.origin_snapshot
    if meta.memory_origin is not None and meta.memory_origin.is_relative_to(root.snapshots_dir):
        yield meta.memory_origin.relative_to(root.snapshots_dir).parts[0]


# --- repair ----------------------------------------------------------------------------

async def repair(registry: Registry) -> list[Problem]:
    """Fix what is safe to fix, then scan again: each problem found first is reported
    with `repaired` telling whether it is gone."""
    root = registry.data_root
    bridge = registry.settings.network_bridge
    before = await scan(root, bridge)
    for problem in before:
        await _fix(registry, root, problem)
    after = {(p.kind, p.path) for p in await scan(root, bridge)}
    for problem in before:
        problem.repaired = (problem.kind, problem.path) not in after
    return before


async def _fix(registry: Registry, root: DataRoot, problem: Problem) -> None:
    path = Path(problem.path)
    if problem.kind in DEBRIS:
        await to_thread(_remove, path)
    elif problem.kind is Kind.ORPHANED_ADDRESS:
        address = problem.path.rsplit(":", 1)[1]
        owner = (await to_thread(read_json, root.network_leases)).get(address)
        if owner is not None:
            await to_thread(network.release_owner, root, registry.settings, owner)
    elif problem.kind in (Kind.ORPHANED_TAP, Kind.BRIDGE_SERVICES, Kind.IDLE_BRIDGE):
        metas = await to_thread(registry.all_metadata)
        await to_thread(network.repair_bridge, root, registry.settings, metas,
                                present_ids(root))
    elif problem.kind is Kind.STRAY_QEMU:
        for identity, instance_id in stray_qemus(root):
            if str(root.instance(instance_id).root) == problem.path:
                await to_thread(TrackedProcess(identity).kill)
    elif problem.kind in PER_INSTANCE:
        instance_id = path.relative_to(root.instances_dir).parts[0]
        with contextlib.suppress(Busy, NotFound):  # busy: an operation puts it right itself
            await _repair_instance(registry, instance_id, problem.kind, path)


async def _repair_instance(registry: Registry, instance_id: str, kind: Kind,
                           path: Path) -> None:
    """One instance's problem, under its lock (never waited for: a busy instance is being
    put right by the operation that holds it). Recovery runs as the lock is taken; what
    it does not cover is done here."""
    async with registry.locked(instance_id, Action.CONFIGURE, wait=0) as ctx:
        if kind is Kind.CRASHED and ctx.state is InstanceState.CRASHED and ctx.record:
            await lifecycle.terminate(ctx, ctx.record.process())
            lifecycle.discard_memory_file(ctx)
        elif kind is Kind.STALE_TEMP:
            path.unlink(missing_ok=True)
        elif kind is Kind.ORPHANED_PLAN:
            await to_thread(
                compression_jobs.requeue, ctx.data_root,
                compression_jobs.Subject.instance(ctx.meta.id), ctx.meta.compression_plan,
                ctx.settings)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        remove_tree(path)
    else:
        path.unlink(missing_ok=True)


