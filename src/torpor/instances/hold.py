"""Holds: an instance kept awake until a time, whatever its idle clock says (a client
about to connect must not race the auto-standby). One file per instance, written
atomically and without the instance's lock: a hold is no operation on the VM, so it
neither waits for one nor is refused by one."""

from __future__ import annotations

from datetime import datetime, timedelta

from torpor.fsutil import atomic_write_json, read_json
from torpor.instances.metadata import utc_now
from torpor.paths import InstancePaths


def hold_end(paths: InstancePaths) -> datetime | None:
    """The end of the instance's last hold, past or to come (an idle clock counts from
    it: a hold is activity)."""
    try:
        return datetime.fromisoformat(read_json(paths.hold_file)["until"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def held_until(paths: InstancePaths) -> datetime | None:
    """The end of the instance's hold, if one is in force now."""
    until = hold_end(paths)
    return until if until is not None and until > utc_now() else None


def hold(paths: InstancePaths, seconds: float) -> datetime:
    until = utc_now() + timedelta(seconds=seconds)
    atomic_write_json(paths.hold_file, {"until": until.isoformat()})
    return until


def release(paths: InstancePaths) -> None:
    paths.hold_file.unlink(missing_ok=True)
