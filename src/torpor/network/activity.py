"""What a relay tells the daemon's idle clock: how many connections to its published
ports are open, how many it holds while their VM wakes, and when that last changed. A
small JSON file the relay replaces (rename, no fsync: it describes a live process, and
a crash that loses it loses nothing the relay would not rewrite)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Activity:
    open: int = 0  # connections relayed or held now
    held: int = 0  # of those, waiting for their VM to wake
    changed: float = 0.0  # time.time() of the last change

    @property
    def busy(self) -> bool:
        return self.open > 0 or self.held > 0


def read_activity(path: Path) -> Activity:
    try:
        raw = json.loads(path.read_text())
        return Activity(open=int(raw["open"]), held=int(raw["held"]),
                        changed=float(raw["changed"]))
    except (OSError, ValueError, KeyError, TypeError):
        return Activity()


def write_activity(path: Path, activity: Activity) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(asdict(activity)))
    os.replace(tmp, path)
