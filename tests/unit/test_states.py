"""The state table's rules for an unresponsive instance (a hung QEMU: alive, its monitor
silent): under the lock only what ends the VM goes through, with a hint that says how;
before the lock nothing is refused for it (the monitor may only be busy with another
request's operation, which the lock waits for)."""

from __future__ import annotations

import pytest

from torpor.errors import WrongState
from torpor.instances.metadata import InstanceState
from torpor.instances.states import Action, require

ENDS_THE_VM = {Action.STOP, Action.STOP_FORCE, Action.DELETE_FORCE, Action.CONFIGURE}


@pytest.mark.parametrize("action", list(Action))
def test_an_unresponsive_instance_only_lets_through_what_ends_it(action: Action) -> None:
    if action in ENDS_THE_VM:
        require(action, "vm", InstanceState.UNRESPONSIVE)
        return
    with pytest.raises(WrongState, match=r"^instance vm is unresponsive: its QEMU does not"
                       r" answer its monitor; `torpor stop vm` kills it$"):
        require(action, "vm", InstanceState.UNRESPONSIVE)


@pytest.mark.parametrize("action", list(Action))
def test_before_the_lock_unresponsive_refuses_nothing(action: Action) -> None:
    require(action, "vm", InstanceState.UNRESPONSIVE, locked=False)
