"""Pushes and remote-deletes under one prefix exclude each other, by lock objects.

A push skips the chunks the bucket has already; a remote-delete removes the chunks no
remaining manifest references. Run together, the delete could remove a chunk the push
skipped before the push's manifest exists: a snapshot naming a chunk the bucket no longer
holds. So each writes a lock object under the prefix (`locks/`) and then lists the locks:
a push that finds a live delete lock, or a delete that finds a live push lock, takes its
own away and refuses (Busy). Both write before they list and S3 lists what was written
before (strong read-after-write consistency), so of two that overlap at least one sees
the other (both may: each refuses, and is simply run again).

A lock is live while it was written less than TTL before the lister's own, both times
the server's (LastModified: no host clock is compared). The holder rewrites it every
HEARTBEAT, so a killed process's lock stops counting after TTL; on the host that wrote
it, at once (its process is gone). Pushes do not exclude each other (a chunk uploaded
twice is the same chunk), nor deletes (two that share a chunk may each keep it for the
other: a chunk left over, never one missing).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ValidationError

from torpor.errors import Busy, TorporError
from torpor.fsutil import process_alive, read_proc_stat
from torpor.remote.location import Location
from torpor.remote.store import NoSuchObject, ObjectStore

log = logging.getLogger(__name__)

Kind = Literal["push", "delete"]
EXCLUDES: dict[Kind, Kind] = {"push": "delete", "delete": "push"}
TTL = 120.0  # s: a lock not rewritten for this long belongs to a process that died
HEARTBEAT = 30.0  # s between rewrites of a held lock
NAMES: dict[Kind, str] = {"push": "a push", "delete": "a remote-delete"}


class LockRecord(BaseModel):
    """What a lock object says, for the message of the one it stops."""

    kind: Kind
    host: str
    pid: int
    start_time: int  # the process's, in /proc/PID/stat: a reused pid is not it
    since: datetime

    def alive_here(self) -> bool:
        """False only when it was written on this host by a process that is gone."""
        return self.host != socket.gethostname() or process_alive(self.pid, self.start_time)


@contextlib.contextmanager
def held(store: ObjectStore, location: Location, kind: Kind) -> Iterator[None]:
    """Hold a `kind` lock under `location` for the block; Busy if a live lock of the kind
    it excludes is there (nothing else done then)."""
    me = read_proc_stat(os.getpid())
    assert me is not None
    record = LockRecord(kind=kind, host=socket.gethostname(), pid=os.getpid(),
                        start_time=me[1], since=datetime.now(UTC))
    key = location.lock_key(f"{kind}-{secrets.token_hex(6)}")
    body = record.model_dump_json().encode()
    store.put(key, body)
    try:
        _refuse_if_excluded(store, location, key, kind)
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(store, key, body, stop),
                                name="torpor-remote-lock")
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
    finally:
        try:
            store.delete([key])
        except TorporError as exc:  # it expires by itself; the operation's outcome stands
            log.warning("could not remove the lock %s: %s", key, exc)


def _refuse_if_excluded(store: ObjectStore, location: Location, own_key: str,
                        kind: Kind) -> None:
    """Busy if a live lock of the kind `kind` excludes is listed. Locks found dead on the
    way (expired; of that kind, their process gone from this host) are removed."""
    listed = dict(store.listing(location.locks_prefix))
    now = listed.pop(own_key, None)
    if now is None:  # our own write not listed: no basis to judge the others by
        raise Busy(f"{location}: the lock just written is not listed yet; try again")
    dead = [key for key, written in listed.items() if (now - written).total_seconds() >= TTL]
    blocking: LockRecord | str | None = None
    for key in sorted(k for k in set(listed) - set(dead)
                      if _kind(location, k) == EXCLUDES[kind]):
        try:
            holder = _read(store, key)
        except NoSuchObject:  # it ended meanwhile
            continue
        if holder is not None and not holder.alive_here():
            dead.append(key)
        elif blocking is None:
            blocking = holder or key
    if dead:
        with contextlib.suppress(TorporError):
            store.delete(dead)
    if blocking is not None:
        by = "" if isinstance(blocking, str) else (
            f" (from {blocking.host}, pid {blocking.pid}, since"
            f" {blocking.since:%Y-%m-%d %H:%M:%S} UTC)")
        other = EXCLUDES[kind]
        raise Busy(f"{location}: {NAMES[other]} is running there{by}; {NAMES[kind]} waits"
                   f" for it to end (a lock left by a process that died expires after"
                   f" {TTL:.0f} s)")


def _kind(location: Location, key: str) -> str:
    return key.removeprefix(location.locks_prefix).partition("-")[0]


def _read(store: ObjectStore, key: str) -> LockRecord | None:
    """The lock's record; None if it cannot be read as one (it counts as live)."""
    try:
        return LockRecord.model_validate_json(store.get(key))
    except NoSuchObject:
        raise
    except (TorporError, ValidationError):
        return None


def _heartbeat(store: ObjectStore, key: str, body: bytes, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT):
        try:
            store.put(key, body)
        except TorporError as exc:  # the next beat may get through; the operation goes on
            log.warning("could not refresh the lock %s: %s", key, exc)
