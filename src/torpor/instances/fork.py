"""Fork: new instances from a stored snapshot's payload or a source instance's directory.

Each fork is a copy (reflink where the filesystem can, sparse otherwise) that shares
nothing writable with its source, and gets a new identity: id, name, MAC address, VM
generation id (QEMU's vmgenid device writes the new GUID into the guest when the state is
loaded), and, once it runs, its hostname and the MAC inside the guest (set through the
agent, since the loaded device state still carries the source's MAC).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Literal

from torpor.copy import copy_tree
from torpor.errors import AlreadyExists, OperationFailed
from torpor.fsutil import fsync_dir
from torpor.guest.agent import GuestAgent
from torpor.instances.metadata import (
    InstanceMetadata,
    new_instance_id,
    new_mac,
    new_vmgenid,
    utc_now,
    validate_name,
)
from torpor.paths import DataRoot, InstancePaths

TargetState = Literal["running", "standby", "stopped"]
# Copied from a payload or source: everything but the runtime and the source's logs.
FORK_SKIP = ("run", "logs")


def fork_names(base: str, count: int) -> list[str]:
    validate_name(base)
    if count < 1:
        raise OperationFailed("--count must be at least 1")
    names = [base] if count == 1 else [f"{base}-{i}" for i in range(1, count + 1)]
    for name in names:
        validate_name(name)
    return names


def materialise(data_root: DataRoot, source_dir: Path, name: str,
                existing_names: set[str], origin_snapshot: str | None,
                keep_state: bool) -> InstanceMetadata:
    """Copy `source_dir` (laid out like an instance) into a new instance with a new
    identity. The caller holds the registry lock. Returns the new metadata."""
    if name in existing_names:
        raise AlreadyExists(f"an instance named {name!r} already exists")
    source = InstanceMetadata.load(InstancePaths(source_dir).metadata)
    instance_id = new_instance_id()
    staging = data_root.staging(f"fork-{instance_id}-{secrets.token_hex(3)}")
    skip = FORK_SKIP if keep_state else (*FORK_SKIP, "snapshots")
    try:
        copy_tree(source_dir, staging, skip=skip, fsync=True)
        paths = InstancePaths(staging)
        for d in (paths.run_dir, paths.logs_dir, paths.snapshots_dir):
            d.mkdir(exist_ok=True)
        meta = source.model_copy(update={
            "id": instance_id, "name": name, "created_at": utc_now(), "mac": new_mac(),
            "vmgenid": new_vmgenid() if source.vmgenid else None,
            "origin_snapshot": origin_snapshot, "last_operation": None,
            "compression_plan": None})
        meta.save(paths.metadata)
        final = data_root.instance(instance_id).root
        os.rename(staging, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


async def apply_guest_identity(paths: InstancePaths, meta: InstanceMetadata) -> None:
    """Inside a restored fork: its own MAC on eth0 (QEMU's virtio-net follows the guest's
    MAC change) and its own hostname."""
    script = (f"ip link set eth0 down && ip link set eth0 address {meta.mac} && "
              f"ip link set eth0 up && (ip route add default via 10.0.2.2 2>/dev/null; true) && "
              f"hostname {meta.name} && echo {meta.name} > /etc/hostname")
    async with GuestAgent.connect(paths.agent_socket) as agent:
        result = await agent.exec(["/bin/sh", "-c", script], timeout=30)
    if result.exit_code != 0:
        raise OperationFailed(f"setting the identity of fork {meta.name} failed: "
                              f"{result.stderr.decode(errors='replace').strip()}")
