"""Fork: new instances from a stored snapshot's payload or a source instance's directory.

Each fork is a copy (reflink where the filesystem can, sparse otherwise) that shares
nothing writable with its source, and gets a new identity: id, name, MAC address, VM
generation id (QEMU's vmgenid device writes the new GUID into the guest when the state is
loaded), and, as it resumes, its hostname, the MAC inside the guest (the loaded device
state still carries the source's) and its randomness: set by the guest's identity helper
in the restore's request (guest/identity.py), or else through the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from torpor import faults
from torpor.copy import copy_tree
from torpor.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OperationFailed,
)
from torpor.fsutil import allocated_bytes, fsync_dir, owned_name, remove_tree
from torpor.guest.agent import GuestAgent
from torpor.guest.identity import Identity, new_identity
from torpor.images.imagedisk import (
    CONFIG_PATH,
    GUEST_SHELL,
    GUEST_TOOLS_PATH,
    render_run_config,
    write_run_config,
)
from torpor.instances import observe
from torpor.instances.context import InstanceContext, Settings
from torpor.instances.info import InstanceInfo
from torpor.instances.locking import file_lock
from torpor.instances.metadata import (
    CompressionPolicy,
    InstanceMetadata,
    InstanceState,
    new_instance_id,
    new_mac,
    new_vmgenid,
    utc_now,
    validate_name,
)
from torpor.instances.snapshotrecord import SnapshotRecord, all_records
from torpor.instances.states import Action, TargetState, is_live
from torpor.jobs import compression as compression_jobs
from torpor.machinestate.manifest import Manifest
from torpor.operations import delete as delete_op
from torpor.operations import lifecycle, network, snapshots
from torpor.operations import restore as restore_op
from torpor.operations.registry import Registry
from torpor.paths import DataRoot, InstancePaths
from torpor.tasks import threads, to_thread

# A fork's own snapshots are never compressed: a temporary one is read at once, and forks
# map a base's RAM file, which must stay raw.
NO_COMPRESSION = CompressionPolicy()
# Copied from a payload or source: everything but the runtime and the source's logs.
FORK_SKIP = ("run", "logs", "publish", "hold.json")


def fork_names(base: str, count: int) -> list[str]:
    validate_name(base)
    if count < 1:
        raise OperationFailed("--count must be at least 1")
    names = [base] if count == 1 else [f"{base}-{i}" for i in range(1, count + 1)]
    for name in names:
        validate_name(name)
    return names


def materialise(data_root: DataRoot, settings: Settings, source_dir: Path, name: str,
                existing_names: set[str], origin_snapshot: str | None,
                keep_state: bool) -> InstanceMetadata:
    """Copy `source_dir` (laid out like an instance) into a new instance with a new
    identity. The caller holds the registry lock. Returns the new metadata.
    From a stored snapshot (`origin_snapshot`) in memory-file mode, the RAM is not copied:
    the fork maps the snapshot's memory file privately (copy-on-write)."""
    if name in existing_names:
        raise AlreadyExists(f"an instance named {name!r} already exists")
    source_paths = InstancePaths(source_dir)
    source = InstanceMetadata.load(source_paths.metadata)
    instance_id = new_instance_id()
    staging = data_root.staging(owned_name(f"fork-{instance_id}"))
    skip: tuple[str, ...] = FORK_SKIP if keep_state else (*FORK_SKIP, "snapshots")
    memory_origin = source.memory_origin if keep_state else None
    if source_paths.memory_file.exists():
        skip = (*skip, source_paths.memory_file.name)  # a fork never owns the source's RAM
        if keep_state:
            assert origin_snapshot is not None, "only a snapshot's memory file is immutable"
            memory_origin = source_paths.memory_file
    try:
        progress = observe.counter("copy", allocated_bytes(source_dir, skip))
        observe.copied(copy_tree(source_dir, staging, skip=skip, fsync=True, progress=progress))
        paths = InstancePaths(staging)
        for d in (paths.run_dir, paths.logs_dir, paths.snapshots_dir):
            d.mkdir(exist_ok=True)
        net = network.assign(data_root, settings, instance_id, source.network.mode,
                             allow_peers=source.network.allow_peers)
        meta = source.model_copy(update={
            "id": instance_id, "name": name, "created_at": utc_now(), "mac": new_mac(),
            "vmgenid": new_vmgenid() if source.vmgenid else None,
            "origin_snapshot": origin_snapshot, "last_operation": None,
            "compression_plan": None, "memory_origin": memory_origin, "network": net,
            # a host port has one owner: published ports stay with the source
            "port_forwards": []})
        if not keep_state and meta.image.run is not None:  # a clean disk: safe to write
            write_run_config(paths.disk, render_run_config(meta.image.run, name))
        meta.save(paths.metadata)
        final = data_root.instance(instance_id).root
        os.rename(staging, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if source.network.mode == "bridge":
            network.release_owner(data_root, settings, instance_id)
        raise
    return meta


def helper_identity(meta: InstanceMetadata) -> Identity | None:
    """What the guest's identity helper is asked to set as a fork resumes: name, MAC and
    randomness, in one request and with no process started in the guest. A bridged fork's
    address needs `ip`: the agent's script does it all (as for guests without a helper)."""
    if not meta.identity_helper or meta.network.mode == "bridge":
        return None
    return new_identity(meta.name, None if meta.network.mode == "none" else meta.mac)


async def apply_guest_identity(agent: GuestAgent, meta: InstanceMetadata) -> None:
    """Inside a restored fork: its own MAC on eth0 (QEMU's virtio-net follows the guest's
    MAC change), its own randomness and its own hostname."""
    # virtio-net changes its MAC live (VIRTIO_NET_F_CTRL_MAC_ADDR): one command, no
    # link bounce; the down/up path remains for a NIC that refuses a live change.
    # Under TCG each process the guest starts costs tens of ms: groups, not subshells,
    # and shell builtins (echo into /proc for the hostname) wherever a program is not
    # needed; `ip` and the reseeder are the only programs left.
    set_mac = (f"ip link set eth0 address {meta.mac} 2>/dev/null || "
               f"{{ ip link set eth0 down && ip link set eth0 address {meta.mac} && "
               f"ip link set eth0 up && {{ ip route add default via 10.0.2.2 2>/dev/null; "
               f"true; }}; }}")
    # Its own randomness: the loaded kernel's RNG state is the source's, and the default
    # guest's kernel has no VM generation ID driver to reseed it. Host random bytes go into
    # its pool, then the crng is rekeyed from it (the default guest's torpor-reseed).
    if meta.network.mode == "bridge":  # its own address, not the source's
        set_mac = (f"{{ {set_mac}; }} && ip addr flush dev eth0 && ip addr add "
                   f"{meta.network.ip}/{meta.network.prefix} dev eth0 && ip route add "
                   f"default via {meta.network.gateway}")
    oci = meta.image.kind == "oci"
    reseeder = f"{GUEST_TOOLS_PATH}/torpor-reseed" if oci else "/sbin/torpor-reseed"
    reseed = (f"echo {secrets.token_hex(32)} > /dev/urandom && "
              f"{{ [ ! -x {reseeder} ] || {reseeder}; }}")
    script = (f"{{ {set_mac}; }} && {{ {reseed}; }} && "
              f"echo {meta.name} > /proc/sys/kernel/hostname && "
              f"{{ {{ echo {meta.name} > /etc/hostname; }} 2>/dev/null || true; }}")
    if oci:  # torpor's tools, not the image's (it may have none); the next boot's name too
        script = (f"export PATH={GUEST_TOOLS_PATH}; {script} && sed -i "
                  f"\"s/^TORPOR_HOSTNAME=.*/TORPOR_HOSTNAME={meta.name}/\" {CONFIG_PATH}")
    shell = list(GUEST_SHELL) if oci else ["/bin/sh", "-c"]
    result = await agent.exec([*shell, script], timeout=30)
    if result.exit_code != 0:
        raise OperationFailed(f"setting the identity of fork {meta.name} failed: "
                              f"{result.stderr.decode(errors='replace').strip()}")


# --- orchestration --------------------------------------------------------------------------

async def from_snapshot(registry: Registry, record: SnapshotRecord, new_name: str, *,
                        count: int, target_state: TargetState) -> list[InstanceInfo]:
    has_state = record.kind != "stopped"
    names = await _check(registry, new_name, count, target_state, has_state)
    data_root = registry.data_root

    def mapped() -> bool:  # memory-file forks map its RAM file: it stays raw from now on
        return bool(snapshots.dependents(data_root, record.id, registry.all_metadata()))

    async with snapshots.reading(registry.settings, data_root, record.id, mapped):
        created = await _materialise_all(registry, data_root.snapshot(record.id).payload,
                                         names, record.id, has_state)
    return await _bring_up(registry, created, has_state, target_state)


async def from_instance(registry: Registry, source: str, new_name: str, *, count: int,
                        target_state: TargetState) -> list[InstanceInfo]:
    async with registry.locked(source, Action.FORK) as ctx:
        has_state = ctx.state is not InstanceState.STOPPED
        names = await _check(registry, new_name, count, target_state, has_state)
        if has_state and ctx.meta.memory_backing == "file":
            created = await _from_base(registry, ctx, names)
        elif is_live(ctx.state):
            # A temporary overlapped snapshot: the source pauses only for it.
            temp = await _auto_snapshot(ctx, "fork", snapshots.AUTO_TEMPORARY)
            try:
                faults.point("fork.based")
                created = await _materialise_all(
                    registry, registry.data_root.snapshot(temp.id).payload, names, None, True)
            finally:
                await registry.reaper.remove(registry.data_root.snapshot(temp.id).root)
        else:
            # A standby source's state is read: its job stops, and is queued again after.
            plan = (await to_thread(compression_jobs.prepare_for_read, ctx)
                    if has_state else None)
            try:
                created = await _materialise_all(registry, ctx.paths.root, names, None,
                                                 has_state)
            finally:
                await to_thread(
                    compression_jobs.resume_plan, ctx, plan, slots=ctx.settings.compression_jobs,
                    rate_limit=ctx.settings.compression_rate_limit)
    return await _bring_up(registry, created, has_state, target_state)


async def _from_base(registry: Registry, ctx: InstanceContext,
                     names: list[str]) -> list[InstanceMetadata]:
    """Memory-file mode: the forks map one snapshot's RAM file privately (the RAM copied
    once, outside any fork); that base is kept while forks map it and removed with the
    last of them. A standby source's base is tagged with what it was taken of: while it
    is kept, the next fork of the unchanged source uses it again instead of copying the
    source's RAM and disk once more (a template forked in waves)."""
    key = (await to_thread(standby_key, ctx.paths, ctx.meta)
           if ctx.state is InstanceState.STANDBY else None)
    if key is not None:
        kept = await to_thread(kept_base, registry.data_root, ctx.meta.id, key)
        if kept is not None:
            with contextlib.suppress(BaseGone):  # its last fork went meanwhile: a new one
                return await _materialise_from(registry, kept, names, reused=True)
    extra = {} if key is None else {snapshots.SOURCE_STATE_TAG: key}
    # A standby source's disk and RAM file are linked into the base, not copied: the
    # source gets copies of its own only before something may write them (unshare.py).
    base = await _auto_snapshot(ctx, "fork-base", snapshots.AUTO_BASE, extra,
                                link=key is not None)
    return await _materialise_from(registry, base, names)


async def _materialise_from(registry: Registry, base: SnapshotRecord, names: list[str], *,
                            reused: bool = False) -> list[InstanceMetadata]:
    try:
        faults.point("fork.based")
        return await _materialise_all(registry, registry.data_root.snapshot(base.id).payload,
                                      names, base.id, True, reused=reused)
    except BaseException:
        await delete_op.drop_auto_snapshot(registry, base.id)  # if nothing maps it now
        raise


def standby_key(paths: InstancePaths, meta: InstanceMetadata) -> str:
    """What a standby source's fork base is taken of: its saved state (the manifest: the
    state by checksum, the RAM by its sampled pages) and its settings. A base with the
    source's current key holds what a new base would. Not which file holds the RAM: its
    own copy (unshare.py) holds the same."""
    manifest = Manifest.load(paths.standby_dir)
    exclude: dict[str, Any] = {"memory_file": {"identity", "replacing"}}
    digest = hashlib.sha256(manifest.model_dump_json(exclude=exclude).encode())
    digest.update(meta.model_dump_json(exclude={"last_operation", "compression_plan"})
                  .encode())
    return digest.hexdigest()[:32]


def kept_base(data_root: DataRoot, source_id: str, key: str) -> SnapshotRecord | None:
    for record in all_records(data_root):
        if (record.source_id == source_id
                and record.tags.get(snapshots.AUTO_TAG) == snapshots.AUTO_BASE
                and record.tags.get(snapshots.SOURCE_STATE_TAG) == key):
            return record
    return None


class BaseGone(NotFound):
    """A kept fork base was removed (with its last fork) before this fork mapped it."""


async def _auto_snapshot(ctx: InstanceContext, prefix: str, purpose: str,
                         extra_tags: dict[str, str] | None = None, *,
                         link: bool = False) -> SnapshotRecord:
    """A snapshot torpor makes for forks (never compressed: see NO_COMPRESSION)."""
    return await snapshots.create(ctx, f"{prefix}-{secrets.token_hex(4)}",
                                  snapshots.auto_tags(purpose) | (extra_tags or {}),
                                  compression=NO_COMPRESSION, link=link)


async def _check(registry: Registry, new_name: str, count: int, target_state: TargetState,
                 has_state: bool) -> list[str]:
    names = fork_names(new_name, count)
    if target_state == "standby" and not has_state:
        raise InvalidArgument("a stopped source has no machine state: fork it to "
                              "--target-state running or stopped")
    taken = await to_thread(registry.instance_names) & set(names)
    if taken:
        raise AlreadyExists(f"instance names already taken: {', '.join(sorted(taken))}")
    return names


async def _materialise_all(registry: Registry, source_dir: Path, names: list[str],
                           origin: str | None, keep_state: bool, *,
                           reused: bool = False) -> list[InstanceMetadata]:
    data_root = registry.data_root
    async with file_lock(data_root.registry_lock, what="the instance registry"):
        # A kept base is removed under this lock when its last fork goes: once the forks
        # are made here, they keep it.
        if reused and not source_dir.exists():
            raise BaseGone(f"fork base {origin} was removed")
        existing = await to_thread(registry.instance_names)

        def discard(meta: InstanceMetadata) -> None:
            remove_tree(data_root.instance(meta.id).root)
            network.release(data_root, registry.settings, meta)

        # Each copy is mostly waiting on I/O (and its fsync): all at once. A failing
        # copy does not stop the others; each ends, and then all are removed (if the
        # fork is cancelled too: `threads`).
        results = await threads(
            [functools.partial(materialise, data_root, registry.settings, source_dir, name,
                               existing, origin, keep_state) for name in names],
            undo=discard)
    created = [r for r in results if isinstance(r, InstanceMetadata)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        for meta in created:  # all or nothing
            await to_thread(discard, meta)
        raise failures[0]
    return created


async def _bring_up(registry: Registry, forks: list[InstanceMetadata], has_state: bool,
                    target_state: TargetState) -> list[InstanceInfo]:
    """Each fork to its target state, in parallel. All or nothing: if one fails, every
    fork of the operation is deleted."""
    try:
        faults.point("fork.copied")
        results = await asyncio.gather(
            *(_to_target(registry, m, has_state, target_state) for m in forks),
            return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        faults.point("fork.restored")
    except BaseException:
        for meta in forks:  # no half-made fork left
            with contextlib.suppress(NotFound):
                await delete_op.delete(registry, meta.id, force=True)
        raise
    return [r for r in results if not isinstance(r, BaseException)]


async def _to_target(registry: Registry, meta: InstanceMetadata, has_state: bool,
                     target_state: TargetState) -> InstanceInfo:
    """One new fork (in standby, or stopped) to `target_state`, with its own identity
    inside the guest once it runs."""
    action = Action.CONFIGURE
    if target_state == "running":
        action = Action.RESTORE if has_state else Action.START
    async with registry.locked(meta.id, action) as ctx:
        if target_state == "stopped" and has_state:
            await to_thread(remove_tree, ctx.paths.standby_dir)
        elif target_state == "running" and has_state:
            async with restore_op.restored(ctx, registry.reaper,
                                          helper_identity(ctx.meta)) as done:
                if not done.identity_applied:  # on the restore's connection
                    await apply_guest_identity(done.agent, ctx.meta)
        elif target_state == "running":
            await lifecycle.start(ctx)
            if not ctx.meta.identity_helper:  # else it booted with its name, MAC and RNG
                async with GuestAgent.connect(ctx.paths.agent_pipe) as agent:
                    await apply_guest_identity(agent, ctx.meta)
        return await registry.current_info(ctx)
