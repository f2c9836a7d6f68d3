"""Freeze a guest disk at a point in time while the guest keeps running.

`blockdev-snapshot-sync` puts an external qcow2 overlay on top of the disk: from then on
the guest writes into the overlay and the image underneath is read-only, so it can be
copied at leisure with the guest running. An active `block-commit` folds the overlay
back into the image and pivots the guest onto it again (`thaw`).

Why not a `blockdev-backup` job: QEMU 7.2 inactivates every block node when a migration
completes, and refuses to (failing the migration) while a backup job holds write
permission on its target. An overlay needs no job while the machine state is saved.

The overlay file is the marker of a freeze: whoever finds one after a crash folds it back
(`thaw` with QEMU running, `thaw_offline` without), so a guest's writes are never lost.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

from torpor.hypervisor.qmp import Monitor, QmpError

POLL_S = 0.005


def _job_id(device: str) -> str:
    return f"torpor-thaw-{device}"


async def active_image(mon: Monitor, device: str) -> Path:
    """The file the guest's writes to `device` land in."""
    for block in await mon.execute("query-block"):
        if block.get("device") == device and "inserted" in block:
            return Path(block["inserted"]["file"])
    raise QmpError(f"QEMU has no disk {device!r}")


class DiskFreeze:
    """One freeze of one disk of a running QEMU. `freeze`, copy the image, then `thaw`
    on every path (thaw is a no-op when nothing was frozen)."""

    def __init__(self, mon: Monitor, device: str, overlay: Path) -> None:
        self.mon = mon
        self.device = device
        self.overlay = overlay
        self.frozen = False

    async def freeze(self) -> None:
        if self.overlay.exists():
            raise QmpError(f"{self.overlay} exists: an earlier freeze was not folded back")
        try:
            await self.mon.execute("blockdev-snapshot-sync", {
                "device": self.device, "snapshot-file": str(self.overlay),
                "format": "qcow2", "mode": "absolute-paths"})
        except BaseException:
            # QEMU may have created the file and failed after; it holds no guest writes.
            if await _still_on_image(self.mon, self.device, self.overlay):
                self.frozen = True
            else:
                self.overlay.unlink(missing_ok=True)
            raise
        self.frozen = True

    async def thaw(self, timeout: float = 600.0) -> None:
        if self.frozen:
            await thaw(self.mon, self.device, self.overlay, timeout)
            self.frozen = False


async def _still_on_image(mon: Monitor, device: str, overlay: Path) -> bool:
    try:
        return await active_image(mon, device) == overlay
    except QmpError:
        return overlay.exists()  # cannot tell: keep it, a later thaw decides


async def thaw(mon: Monitor, device: str, overlay: Path, timeout: float = 600.0) -> None:
    """Fold the overlay back into the image underneath and put the guest back on it;
    then remove the overlay. Safe to call again after a failure or a crash."""
    if await active_image(mon, device) != overlay:
        overlay.unlink(missing_ok=True)  # never became the guest's image
        return
    job = _job_id(device)
    if not await _job(mon, job):
        await mon.execute("block-commit", {"device": device, "job-id": job,
                                           "auto-dismiss": False})
    deadline = time.monotonic() + timeout
    completing = False
    while True:
        status = await _job(mon, job)
        if status is None:
            raise QmpError(f"the commit job of {device} vanished")
        if status["status"] == "ready" and not completing:
            await mon.execute("job-complete", {"id": job})  # pivot onto the image
            completing = True
        elif status["status"] == "concluded":
            await mon.execute("job-dismiss", {"id": job})
            if "error" in status:
                raise QmpError(f"folding {overlay.name} back into {device} failed:"
                               f" {status['error']}")
            break
        if time.monotonic() > deadline:
            raise QmpError(f"folding {overlay.name} back into {device} took over"
                           f" {timeout:.0f} s; the guest still writes to {overlay}")
        await asyncio.sleep(POLL_S)
    if await active_image(mon, device) == overlay:
        raise QmpError(f"the guest still writes to {overlay} after the commit")
    overlay.unlink()


async def _job(mon: Monitor, job_id: str) -> dict[str, Any] | None:
    for job in await mon.execute("query-jobs"):
        if job.get("id") == job_id:
            return dict(job)
    return None


def thaw_offline(overlay: Path, qemu_img: str = "qemu-img") -> None:
    """No QEMU runs: write the overlay's data into its backing image, then remove it."""
    result = subprocess.run([qemu_img, "commit", "-q", "-f", "qcow2", str(overlay)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise QmpError(f"cannot fold {overlay} back into its image: "
                       f"{result.stderr.strip() or result.returncode}")
    overlay.unlink()
