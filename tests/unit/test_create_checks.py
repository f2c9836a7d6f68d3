"""What create refuses before it builds anything: one line each, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run
from torpor.errors import InvalidArgument
from torpor.manager import InstanceManager
from torpor.operations.create import host_memory_bytes


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"memory_bytes": 32 << 20}, "--memory must be a whole number of MiB, at least 64M"),
    ({"memory_bytes": (256 << 20) + 1}, "--memory must be a whole number of MiB"),
    ({"cpus": 0}, "--cpus must be between 1 and 64"),
    ({"cpus": 65}, "--cpus must be between 1 and 64"),
])
def test_bad_sizes_are_refused(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    manager = InstanceManager(tmp_path)
    with pytest.raises(InvalidArgument, match=message):
        run(manager.create("x", **kwargs))  # type: ignore[arg-type]
    assert run(manager.list_all()) == []


def test_a_guest_larger_than_the_host_is_refused(tmp_path: Path) -> None:
    """It used to be created, and then never started (QEMU: "cannot set up guest memory")."""
    manager = InstanceManager(tmp_path)
    too_large = (host_memory_bytes() >> 20 << 20) + (1 << 30)
    with pytest.raises(InvalidArgument, match=r"^--memory .* is more than this host's .* of RAM$"):
        run(manager.create("x", memory_bytes=too_large))
    assert run(manager.list_all()) == []
