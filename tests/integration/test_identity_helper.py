"""The guest's identity helper (guest/identity.py) in the default guest: a restore has it
set the clock and a fork its name, MAC and randomness, with no agent command (the
record's `identity` phase, and no `clock` phase: the agent's way); a guest whose helper
does not answer is set by the agent instead, after a short grace."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import booted, run, sh
from tests.integration.test_snapshots_fork import identity
from torpor.instances.metadata import InstanceMetadata
from torpor.manager import InstanceManager
from torpor.operations.guest_clock import HELPER_GRACE

pytestmark = pytest.mark.qemu


@pytest.fixture
def guest(manager: InstanceManager, fresh_name: str) -> Iterator[str]:
    yield from booted(manager, fresh_name, memory=256 << 20)
    for info in run(manager.list_all()):
        if info.name.startswith(f"{fresh_name}-"):
            run(manager.delete(info.name, force=True))


def phases(manager: InstanceManager, name: str) -> dict[str, float]:
    last = InstanceMetadata.load(manager.paths(name).metadata).last_operation
    assert last is not None
    return last.phases


def names_inside(manager: InstanceManager, name: str) -> list[str]:
    return sh(manager, name, "hostname; cat /etc/hostname").split()


def test_the_helper_sets_clock_and_fork_identity(manager: InstanceManager, guest: str) -> None:
    assert names_inside(manager, guest) == [guest, guest]  # booted with its name
    # A booted guest's clock comes from the RTC's whole seconds: it may be ahead of the
    # host's by more than a short standby lasts. A first restore sets it exactly; the
    # second finds it behind by that standby.
    for _ in range(2):
        run(manager.standby(guest))
        run(manager.restore(guest))
    done = phases(manager, guest)
    assert "identity" in done and "clock" not in done and done["clock_behind"] > 0
    forks = run(manager.fork(guest, f"{guest}-f", count=2))
    for fork in forks:
        assert "identity" in phases(manager, fork.name)
        assert names_inside(manager, fork.name) == [fork.name, fork.name]
        _, filtered_mac, guest_mac = identity(manager, fork.name)
        assert guest_mac == filtered_mac == fork.mac  # QEMU follows the live change
    assert names_inside(manager, guest) == [guest, guest]  # the source kept its own
    # A fork keeps its name across a reboot (the command line gives it at each boot).
    run(manager.stop(forks[0].name))
    run(manager.start(forks[0].name))
    assert names_inside(manager, forks[0].name) == [forks[0].name] * 2


def test_a_silent_helper_leaves_it_to_the_agent(manager: InstanceManager, guest: str) -> None:
    run(manager.standby(guest))  # the clock set exactly first (see the test above)
    run(manager.restore(guest))
    # Stopped, not killed (init would start it again): it reads nothing, answers nothing.
    sh(manager, guest, "kill -STOP $(pidof torpor-identity)")
    run(manager.standby(guest))
    run(manager.restore(guest))
    done = phases(manager, guest)
    assert done["identity"] >= HELPER_GRACE and "clock" in done and done["clock_behind"] > 0
    # The fork's helper is stopped too: the agent's script sets its identity.
    fork = run(manager.fork(guest, f"{guest}-f"))[0]
    assert {"identity", "clock"} <= set(phases(manager, fork.name))
    assert names_inside(manager, fork.name) == [fork.name, fork.name]
    assert identity(manager, fork.name)[2] == fork.mac
