"""What the benchmarks share: a scratch data root and a manager on it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torpor.instances.context import Settings
from torpor.manager import InstanceManager


def scratch_manager(prefix: str) -> tuple[Path, InstanceManager]:
    """A fresh work directory under /var/tmp (the caller removes it) and a manager on its
    data root, with the accelerator from $TORPOR_ACCEL (default: auto)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    accel = os.environ.get("TORPOR_ACCEL", "auto")
    return workdir, InstanceManager(workdir / "data", Settings(accel=accel))  # type: ignore[arg-type]
