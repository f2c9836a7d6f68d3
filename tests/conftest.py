"""Shared fixtures. Real guests are expensive: the data root, the manager and one
running guest are shared across the session; tests that change a VM's lifecycle get
their own instance."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from torpor.errors import TorporError
from torpor.images.builtin import GuestImage, ensure_builtin_image
from torpor.instances import InstanceState
from torpor.instances.context import Settings
from torpor.manager import InstanceManager

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return ensure_builtin_image(quiet=True)


@pytest.fixture(scope="session")
def data_root() -> Iterator[Path]:
    # Short on purpose: unix socket paths under it must stay below 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="tp-", dir="/tmp"))
    yield root
    subprocess.run(["pkill", "-KILL", "-f", f"{root}/instances"], check=False)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def manager(data_root: Path, guest_image: GuestImage) -> InstanceManager:
    # accel "auto": the real probe runs once per session (and falls back to TCG here).
    return InstanceManager(data_root, Settings(accel=os.environ.get("TORPOR_ACCEL", "auto")))  # type: ignore[arg-type]


def booted(manager: InstanceManager, name: str, memory: int = 512 << 20) -> Iterator[str]:
    """Create and boot an instance for a fixture's lifetime, then delete it."""
    run(manager.create(name, memory_bytes=memory))
    run(manager.start(name))
    yield name
    run(manager.delete(name, force=True))


def throttled(manager: InstanceManager, rate: int) -> InstanceManager:
    """The same data root with background compression jobs capped at `rate` bytes/s (a
    job that runs for many seconds, to be met mid-write)."""
    return InstanceManager(manager.data_root.root,
                           Settings(accel=manager.settings.accel, compression_rate_limit=rate))


def running(manager: InstanceManager, name: str) -> str:
    """`name` running again, whatever state an earlier (failed) test left it in."""
    state = run(manager.get(name)).state
    if state is InstanceState.STANDBY:
        run(manager.restore(name))
    elif state is InstanceState.PAUSED:
        run(manager.resume(name))
    elif state is not InstanceState.RUNNING:
        run(manager.start(name))
    assert run(manager.get(name)).state is InstanceState.RUNNING
    return name


@pytest.fixture(scope="session")
def shared_vm(manager: InstanceManager) -> Iterator[str]:
    """One running guest for tests that only look at it or run commands in it."""
    yield from booted(manager, "shared")


def sh(manager: InstanceManager, name: str, script: str) -> str:
    """Run a shell script in the guest; it must succeed; its stdout."""
    result = run(manager.exec(name, ["sh", "-c", script]))
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode()


# md5 of nothing: what a fill that silently failed would hash to (the guest's busybox
# `head -c 8m` writes nothing), so fills check they wrote something.
EMPTY_MD5 = "d41d8cd98f00b204e9800998ecf8427e"

MARKS = "md5sum /tmp/ram.bin /root/disk.bin"


def write_marks(manager: InstanceManager, name: str, ram_mib: int = 8,
                disk_mib: int = 4) -> str:
    """Random data in the guest's RAM (tmpfs) and on its disk (synced); their md5sums,
    which `read_marks` gives again while both are intact."""
    out = sh(manager, name, f"dd if=/dev/urandom of=/tmp/ram.bin bs=1M count={ram_mib}"
             f" 2>/dev/null; dd if=/dev/urandom of=/root/disk.bin bs=1M count={disk_mib}"
             f" 2>/dev/null; sync; {MARKS}")
    assert EMPTY_MD5 not in out, out
    return out


def read_marks(manager: InstanceManager, name: str) -> str:
    return sh(manager, name, MARKS)


_counter = iter(range(10_000))


def mapped_bytes(pid: int, path: Path) -> int:
    """Resident bytes of process `pid`'s mapping of `path` (its smaps Rss)."""
    found, rss = False, 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's first line
            found = line.split(maxsplit=5)[-1] == str(path)
        elif found and line.startswith("Rss:"):
            rss += int(line.split()[1]) << 10
    return rss


@pytest.fixture
def fresh_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A name no instance has. A test that fails before its own cleanup leaves the
    instance (and what it named after it) to this teardown, not to the next test's
    `check()`: one failure used to fail six more."""
    name = f"vm{next(_counter)}"
    yield name
    if "manager" not in request.fixturenames:
        return
    manager: InstanceManager = request.getfixturevalue("manager")
    for left in sorted(manager.instance_names()):
        if left == name or left.startswith(f"{name}-"):
            with contextlib.suppress(TorporError):
                run(manager.delete(left, force=True))


def torpor_cli(data_root: Path, *args: str, timeout: float = 120, input: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `torpor` command line against a data root (`env`: added to ours)."""
    full_env = dict(os.environ, TORPOR_DATA_ROOT=str(data_root), **(env or {}))
    return subprocess.run([sys.executable, "-m", "torpor.cli.main", *args], env=full_env,
                          input=input, capture_output=True, text=True, timeout=timeout,
                          check=False)


# --- OCI images (tests/oci_helpers.py) --------------------------------------------------

@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 for the session: its host:port."""
    from tests.oci_helpers import docker_registry

    with docker_registry(tmp_path_factory.mktemp("registry")) as address:
        yield address


@pytest.fixture(scope="session")
def image_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI layout with the busybox test image as `web`, and `web-more`: the same
    image plus one layer."""
    from tests.oci_helpers import add_layer, busybox_image

    layout = tmp_path_factory.mktemp("images") / "layout"
    busybox_image(layout, "web")
    add_layer(layout, "web", "web-more", "extra.txt", "one more layer\n")
    return layout


@pytest.fixture(scope="session", autouse=True)
def machine_namespace_untouched() -> Iterator[None]:
    """The network rule, checked: after the session, the machine's own network namespace
    has no torpor bridge, TAP or nftables table (those live in the tests' namespaces)."""
    yield
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=False).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                            check=False).stdout
    leaked = [line.split(":")[1].strip() for line in links.splitlines()
              if line.split(":")[1].strip().startswith(("torpor0", "tp"))]
    assert not leaked and "torpor_" not in tables, (leaked, tables)
