"""Which operation an instance's state allows: one table, one guard.

State is derived, never stored (instances/runtime.py). Every locked operation names its
`Action`; the registry refuses a wrong state twice from this table: once before taking
the lock (a request that is wrong anyway never waits for, or holds, the lock against one
that is right) and once under it, after recovery (that check is the one that counts).
Operations do not check again: they are handed the state the guard saw.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from torpor.errors import WrongState
from torpor.instances.metadata import InstanceState

S = InstanceState
LIVE = frozenset({S.RUNNING, S.PAUSED})  # a QEMU process holds the guest and answers
# A QEMU process holds the guest's disk and RAM, whether it answers or not.
HOLDS_QEMU = LIVE | {S.UNRESPONSIVE}
EVERY = frozenset(S)
# An unresponsive QEMU (hung: it runs, its monitor does not answer) can only be killed.
UNRESPONSIVE_REFUSAL = ("instance {name} is unresponsive: its QEMU does not answer its"
                        " monitor; `torpor stop {name}` kills it")
# What a fork is brought to once copied.
TargetState = Literal["running", "standby", "stopped"]


class Action(StrEnum):
    START = "start"
    STOP = "stop"
    STOP_FORCE = "stop --force"
    STANDBY = "standby"
    RESTORE = "restore"
    RESUME = "resume"
    DELETE = "delete"
    DELETE_FORCE = "delete --force"
    SNAPSHOT = "snapshot"
    SNAPSHOT_RESTORE = "snapshot restore"
    FORK = "fork"
    EXEC = "exec"
    CONFIGURE = "configure"  # settings only (the compression policy): any state
    WAKE = "wake"  # traffic for a published port: restore if in standby, else nothing
    PREPARE_RESTORE = "prepare restore"  # the daemon's restore pool starts its QEMU

# Actions that keep a QEMU started ahead of the restore (operations/warm.py): the restore
# claims it; every other action on the instance discards it first.
KEEPS_WARM_QEMU = frozenset({Action.RESTORE, Action.WAKE, Action.CONFIGURE,
                             Action.PREPARE_RESTORE})
# Actions that neither run the instance nor write its disk or RAM file: they leave those
# linked into a fork base (operations/unshare.py). Before every other action, whatever it
# does, the instance guard (Registry.locked) gives the instance copies of its own.
LEAVES_FILES_SHARED = frozenset({Action.FORK, Action.SNAPSHOT, Action.DELETE,
                                 Action.DELETE_FORCE, Action.CONFIGURE})


@dataclass(frozen=True)
class Rule:
    allowed: frozenset[InstanceState]
    refusal: str  # {name}, {state}
    hints: Mapping[InstanceState, str] = field(default_factory=dict)  # a better refusal
    # Under the lock only: states in which recovery has already done the work.
    done_in: frozenset[InstanceState] = frozenset()


RULES: dict[Action, Rule] = {
    Action.START: Rule(
        frozenset({S.STOPPED, S.CRASHED}), "instance {name} is already {state}",
        {S.STANDBY: "instance {name} is in standby: use `torpor restore {name}`"}),
    Action.STOP: Rule(
        HOLDS_QEMU | {S.CRASHED}, "instance {name} is not running",
        {S.STANDBY: "instance {name} is in standby: restore it, or discard its saved state"
                    " with `stop --force`"}),
    Action.STOP_FORCE: Rule(HOLDS_QEMU | {S.CRASHED, S.STANDBY},
                            "instance {name} is not running"),
    Action.STANDBY: Rule(
        LIVE, "instance {name} is {state}: only a running VM can go into standby",
        {S.STANDBY: "instance {name} is already in standby"}),
    Action.RESTORE: Rule(
        frozenset({S.STANDBY}), "instance {name} has no standby state to restore (it is {state})"),
    Action.RESUME: Rule(
        frozenset({S.PAUSED}), "instance {name} is {state}, not paused",
        done_in=frozenset({S.RUNNING})),
    Action.DELETE: Rule(
        EVERY - HOLDS_QEMU, "instance {name} is {state}: stop it first, or use --force"),
    Action.DELETE_FORCE: Rule(EVERY, ""),
    Action.SNAPSHOT: Rule(
        EVERY - {S.CRASHED, S.UNRESPONSIVE},
        "instance {name} is crashed: stop it (or start it) first"),
    Action.SNAPSHOT_RESTORE: Rule(
        EVERY - HOLDS_QEMU, "instance {name} is {state}: stop it (or put it in standby) first"),
    Action.FORK: Rule(
        EVERY - {S.CRASHED, S.UNRESPONSIVE}, "instance {name} is crashed: stop or start it first"),
    Action.EXEC: Rule(
        frozenset({S.RUNNING}), "instance {name} is {state}, not running",
        {S.STANDBY: "instance {name} is in standby, not running: `torpor restore {name}` first"}),
    Action.CONFIGURE: Rule(EVERY, ""),
    Action.WAKE: Rule(
        LIVE | {S.STANDBY}, "instance {name} is {state}: only an instance in standby wakes"
        " on traffic"),
    Action.PREPARE_RESTORE: Rule(
        frozenset({S.STANDBY}), "instance {name} is {state}: only an instance in standby"
        " has a QEMU waiting for its restore"),
}


def require(action: Action, name: str, state: InstanceState, *, locked: bool = True) -> None:
    """WrongState (exit code 4) unless `action` may run on an instance in `state`.
    `locked`: the check under the lock, where recovery may already have done the work,
    and where a monitor that does not answer is a hung QEMU (before the lock it may be one
    busy with another request's operation)."""
    rule = RULES[action]
    if state in rule.allowed or (locked and state in rule.done_in):
        return
    if not locked and state is S.UNRESPONSIVE:
        return  # maybe only busy with an operation in flight: decided under the lock
    default = UNRESPONSIVE_REFUSAL if state is S.UNRESPONSIVE else rule.refusal
    template = rule.hints.get(state, default)
    raise WrongState(template.format(name=name, state=state))


def refuses_any(action: Action) -> bool:
    """Whether some state refuses `action` (if not, its state need not be asked first)."""
    return RULES[action].allowed != EVERY


def is_live(state: InstanceState) -> bool:
    """A QEMU process holds the guest (running or paused)."""
    return state in LIVE
