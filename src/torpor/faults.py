"""Named fault points: places in an operation where a test can make it fail or die.

    faults.point("standby.saved")      # in the operation's code: a no-op unless enabled

    TORPOR_FAULTS="standby.saved=kill"             # in the test's environment
    TORPOR_FAULTS="restore.loaded=error,fork.copied=kill"

The fail-point pattern of etcd's gofail and TiKV's fail-rs, reduced to what torpor's
tests need: `error` raises `InjectedFault` (an OperationFailed, so the operation's own
failure handling runs), `kill` sends SIGKILL to the process itself (what a crash, an OOM
kill or `kill -9` of the CLI or daemon does: no handler, no cleanup), `interrupt` sends
SIGINT to the process itself (a Ctrl-C: the operation is cancelled at its next await and
its cleanup runs), `exec` runs the
shell command in TORPOR_FAULT_EXEC and carries on (a test kills QEMU there: QEMU dying
mid-save, mid-load, mid-snapshot). The variable is read
at every point, so a test can enable a point in-process for one call; nothing is read or
done when it is unset. `POINTS` lists every point, so the test matrix can prove that it
covers them all and a typo in a test is an error, not a point that never fires.
"""

from __future__ import annotations

import os
import signal
import subprocess

from torpor.errors import InvalidArgument, OperationFailed

ENV = "TORPOR_FAULTS"
EXEC_ENV = "TORPOR_FAULT_EXEC"
ACTIONS = ("error", "kill", "interrupt", "exec")

# Every point, in the order an operation passes them, with what has happened by then.
POINTS: dict[str, str] = {
    # standby
    "standby.paused": "the VM is paused; nothing is saved yet",
    "standby.saved": "the state is written to .latest.partial; not yet renamed",
    "standby.published": "latest/ is in place; QEMU has not been told to quit",
    "standby.stopped": "QEMU has exited; the checksum is not yet in the manifest",
    # restore
    "restore.spawned": "the incoming QEMU runs; the state is not yet loaded",
    "restore.loaded": "the state is loaded and verified; the VM is paused",
    "restore.consumed": "the saved state is set aside as consumed; `cont` not yet sent",
    "restore.resumed": "the guest runs; the agent has not answered yet",
    "restore.agent": "the agent answered; the consumed state's removal may be under way",
    # snapshot of a running VM
    "snapshot.paused": "the source is paused; neither leg has started",
    "snapshot.frozen": "the disk is frozen under its overlay; the pause goes on",
    "snapshot.saved": "the save leg has written the state; the source is still paused",
    "snapshot.resumed": "the source runs again; the disk copy may still be going",
    "snapshot.copied": "both legs have ended; the overlay is not yet folded back",
    "snapshot.thawed": "the overlay is folded back; the snapshot is not yet flushed",
    "snapshot.flushed": "the snapshot is complete in .creating-*; not yet published",
    "snapshot.published": "the snapshot is published; its record is not yet persisted",
    # fork
    "fork.based": "the snapshot the forks are copied from is published",
    "fork.copied": "the forks exist as instances with the saved state; none restored",
    "fork.restored": "the forks run; the operation has not returned",
    # a standby source's own copies of what a fork base linked (operations/unshare.py)
    "unshare.copied": "the copy is complete beside the file; the manifest names both",
    "unshare.replaced": "the copy is renamed over the file; the manifest still names both",
    # what an operation leaves behind (tasks.Reaper; in the daemon, after the call)
    "reaper.set-aside": "a tree is renamed aside (.deleting-*); its removal has not begun",
    # delete
    "delete.killed": "the QEMU is killed; the directory is still there",
    "delete.removed": "the directory is gone; its job files and lock file are not",
    # snapshots in object storage
    "push.locked": "the push's lock is in the bucket (remote/locks.py); no chunk yet",
    "push.uploaded": "a chunk is in the bucket (more may follow); the manifest is not",
    "pull.fetched": "a chunk is written into .creating-* (more may follow)",
    "pull.downloaded": "every file is downloaded and verified in .creating-*; not published",
    "remote-delete.locked": "the delete's lock is in the bucket; nothing is deleted yet",
    # compression of a saved state (the background worker, or `auto` after the window)
    "compress.written": "the compressed file is complete as .tmp; nothing published",
    "compress.renamed": "the compressed file is in place beside the raw one",
    "compress.recorded": "the manifest names the compressed file; the raw one is still there",
}


class InjectedFault(OperationFailed):
    """The failure a test asked for at a fault point."""


def _enabled() -> dict[str, str]:
    spec = os.environ.get(ENV, "")
    wanted: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        if name not in POINTS or action not in ACTIONS:
            raise InvalidArgument(f"{ENV}: {item!r} is not POINT={'|'.join(ACTIONS)} with a"
                                  " known point")
        wanted[name] = action
    return wanted


def point(name: str) -> None:
    """Pass fault point `name`: fail or die here if the environment says so."""
    assert name in POINTS, f"unknown fault point {name}"
    if ENV not in os.environ:
        return
    action = _enabled().get(name)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "interrupt":
        os.kill(os.getpid(), signal.SIGINT)
    elif action == "error":
        raise InjectedFault(f"injected fault at {name}")
    elif action == "exec":
        subprocess.run(["sh", "-c", os.environ.get(EXEC_ENV, "true")], check=False)
