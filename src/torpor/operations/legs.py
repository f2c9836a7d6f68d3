"""Running the save leg and the copy leg of a snapshot at the same time.

A plain task group's rule is wrong for the copy: a failing copy must NOT cancel the save,
because QEMU is still writing into the snapshot directory; the operation waits for the
save to end before anyone cleans up. So the copy leg's failure is kept, not raised, in
the group, and reported once both legs have ended. A failing save does cancel the copy
(it observes cancellation promptly). Either way both legs have ended when `run_legs`
returns or raises (tasks.task_group).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from torpor.errors import OperationFailed
from torpor.tasks import task_group

T = TypeVar("T")
U = TypeVar("U")


class LegFailed(OperationFailed):
    """Names the leg that failed; `error` is its exception."""

    def __init__(self, leg: str, error: BaseException, other: BaseException | None = None):
        detail = f"the {leg} leg failed: {error}"
        if other is not None:
            detail += f" (and the other leg too: {other})"
        super().__init__(detail)
        self.leg = leg
        self.error = error


async def run_legs(save: Coroutine[Any, Any, T], copy: Coroutine[Any, Any, U]) -> tuple[T, U]:
    copied: list[U] = []
    copy_failure: list[Exception] = []

    async def copy_leg() -> None:
        try:
            copied.append(await copy)
        except Exception as exc:  # kept: raised in the group, it would cancel the save
            copy_failure.append(exc)

    try:
        async with task_group() as group:
            save_task = group.create_task(save, name="save-leg")
            group.create_task(copy_leg(), name="copy-leg")
    except Exception as save_error:  # only the save leg raises in the group
        if copy_failure:  # the copy failed first; the save, awaited, then failed too
            raise LegFailed("copy", copy_failure[0], save_error) from copy_failure[0]
        raise LegFailed("save", save_error) from save_error
    if copy_failure:
        raise LegFailed("copy", copy_failure[0]) from copy_failure[0]
    return save_task.result(), copied[0]
