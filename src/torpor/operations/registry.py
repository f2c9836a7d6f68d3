"""The instances of one data root: finding them, and holding one for an operation.

`locked(name, action)` is the only way an operation gets an instance: the state guard
(instances/states.py) refuses a wrong state before the lock and again under it, the
instance's metadata is re-read under the lock, and whatever a killed operation left is
put right first (operations/recover.py). The operation is handed the state the guard saw.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from torpor.errors import NotFound
from torpor.instances.context import InstanceContext, Settings
from torpor.instances.hold import held_until
from torpor.instances.info import InstanceInfo, NetworkInfo
from torpor.instances.locking import file_lock
from torpor.instances.metadata import InstanceMetadata, InstanceState
from torpor.instances.runtime import PRE_LOCK_QUERY_TIMEOUT, derive_state, exit_code
from torpor.instances.states import (
    KEEPS_WARM_QEMU,
    LEAVES_FILES_SHARED,
    Action,
    refuses_any,
    require,
)
from torpor.jobs import compression as compression_jobs
from torpor.operations import unshare, warm
from torpor.operations.recover import recover
from torpor.paths import DataRoot
from torpor.tasks import Reaper, to_thread


def effective_auto_standby(meta: InstanceMetadata, settings: Settings) -> float:
    """Seconds idle before the daemon's standby: the instance's policy, else the
    server's default (0: never)."""
    return meta.auto_standby if meta.auto_standby is not None else settings.auto_standby

Wait = float | Literal["default"] | None


BACKGROUND_HOLD_WAIT = 10.0  # s: a request's longest wait for a background holder


class MetadataCache:
    """metadata.json parsed once per version: it is only ever replaced by a rename, so a
    file whose (inode, size, mtime) is unchanged has not changed. Listing a data root
    costs a stat per instance, not a parse (the daemon lists on most requests)."""

    def __init__(self) -> None:
        self._parsed: dict[Path, tuple[tuple[int, int, int], InstanceMetadata]] = {}

    def load(self, path: Path) -> InstanceMetadata:
        st = os.stat(path)
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._parsed.get(path)
        if cached is not None and cached[0] == key:
            return cached[1].model_copy(deep=True)  # callers may change and save theirs
        meta = InstanceMetadata.load(path)
        self._parsed[path] = (key, meta.model_copy(deep=True))
        return meta


class Registry:
    def __init__(self, data_root: DataRoot, settings: Settings,
                 lock_wait: float | None = None) -> None:
        self.data_root = data_root
        self.settings = settings
        self.lock_wait = lock_wait  # None: wait for a busy instance; 0: fail at once
        self._cache = MetadataCache()
        # Instances whose lock a background task of this process holds for a moment
        # (the restore pool starting a QEMU): a request waits for it, not fails busy.
        self._held_in_background: set[str] = set()
        # Removes what operations leave behind (a loaded state, a fork's temporary
        # snapshot, a deleted instance or snapshot): after they return while the daemon
        # runs it, else before. An instance's next operation waits for its share.
        self.reaper = Reaper()

    def all_metadata(self) -> list[InstanceMetadata]:
        found = []
        if not self.data_root.instances_dir.exists():
            return []
        for entry in sorted(self.data_root.instances_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError, ValueError):
                found.append(self._cache.load(self.data_root.instance(entry.name).metadata))
        return found

    def instance_names(self) -> set[str]:
        return {m.name for m in self.all_metadata()}

    def find(self, name_or_id: str) -> InstanceMetadata:
        for meta in self.all_metadata():
            if name_or_id in (meta.name, meta.id):
                return meta
        raise NotFound(f"no instance named {name_or_id!r}")

    @contextlib.asynccontextmanager
    async def locked(self, name: str, action: Action, *, wait: Wait = "default"
                     ) -> AsyncIterator[InstanceContext]:
        """The instance held for `action`: its lock, fresh metadata, recovery done, the
        state checked. A wrong state is refused before the lock is taken too, so a request
        that is wrong anyway never holds the lock against one that is right."""
        meta = await to_thread(self.find, name)
        if refuses_any(action):  # one QMP query saved for what every state allows
            state, _ = await derive_state(self.data_root.instance(meta.id),
                                          timeout=PRE_LOCK_QUERY_TIMEOUT)
            require(action, meta.name, state, locked=False)
        timeout = self.lock_wait if wait == "default" else wait
        if meta.id in self._held_in_background and timeout is not None:
            timeout = max(timeout, BACKGROUND_HOLD_WAIT)
        async with file_lock(self.data_root.instance_lock(meta.id), what=f"instance {name}",
                             wait=timeout):
            paths = self.data_root.instance(meta.id)
            await self.reaper.settled(paths.root)
            try:
                fresh = await to_thread(self._cache.load, paths.metadata)
            except FileNotFoundError:
                raise NotFound(f"no instance named {name!r}") from None
            ctx = InstanceContext(self.data_root, self.settings, fresh, paths)
            recovery = await recover(ctx)  # whatever a killed operation left, put right first
            if action not in LEAVES_FILES_SHARED:  # its own, before anything may write them
                await unshare.own_files(ctx)
            # A QEMU the restore pool started ahead (memory-file instances only): only a
            # restore may use it.
            if fresh.memory_backing == "file" and action not in KEEPS_WARM_QEMU:
                await to_thread(warm.discard, paths)
            ctx.state, ctx.record = await derive_state(paths,
                                                       known_silent=recovery.qemu_silent)
            require(action, ctx.name, ctx.state)
            yield ctx

    @contextlib.asynccontextmanager
    async def locked_in_background(self, name: str, action: Action
                                   ) -> AsyncIterator[InstanceContext]:
        """`locked` for a short background task that never waits for the lock: while it
        holds it, requests on the instance wait for it (BACKGROUND_HOLD_WAIT at most)
        instead of failing busy."""
        meta = await to_thread(self.find, name)
        self._held_in_background.add(meta.id)
        try:
            async with self.locked(name, action, wait=0) as ctx:
                yield ctx
        finally:
            self._held_in_background.discard(meta.id)

    async def info(self, meta: InstanceMetadata) -> InstanceInfo:
        paths = self.data_root.instance(meta.id)
        state, record = await derive_state(paths)
        return InstanceInfo(
            name=meta.name, id=meta.id, state=state, cpus=meta.cpus,
            memory_mib=meta.memory_mib, disk_bytes=meta.disk_bytes, mac=meta.mac,
            memory_backing=meta.memory_backing,
            created_at=meta.created_at, path=paths.root,
            pid=record.identity.pid if record and state is not InstanceState.CRASHED else None,
            accel=record.vm_config.accel if record else None,
            last_operation=meta.last_operation,
            image=meta.image.reference if meta.image.kind == "oci" else "builtin",
            image_digest=meta.image.digest,
            network=NetworkInfo(
                mode=meta.network.mode, ip=meta.network.ip, mac=meta.mac,
                bridge=meta.network.bridge, allow_peers=meta.network.allow_peers,
                published=[f"{f.host_addr}:{f.host_port}:{f.guest_port}/{f.protocol}"
                           for f in meta.port_forwards]),
            auto_standby=effective_auto_standby(meta, self.settings),
            held_until=held_until(paths),
            exit_code=exit_code(paths) if meta.image.kind == "oci" and
            state is InstanceState.STOPPED else None,
            compression=compression_jobs.status(
                self.data_root, compression_jobs.Subject.instance(meta.id),
                meta.compression_plan),
        )

    async def current_info(self, ctx: InstanceContext) -> InstanceInfo:
        """What an operation's caller is handed back: the instance as it is now."""
        return await self.info(await to_thread(self._cache.load, ctx.paths.metadata))

    async def get(self, name: str) -> InstanceInfo:
        return await self.info(await to_thread(self.find, name))
