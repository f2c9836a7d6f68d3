"""The leg runner's failure rules, with legs that fail on cue."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from tests.copy.helpers import MiB, make_sparse
from torpor.copy import copy_tree
from torpor.operations.legs import LegFailed, run_legs
from torpor.tasks import in_thread


def test_both_legs_succeed() -> None:
    async def save() -> str:
        await asyncio.sleep(0)
        return "saved"

    async def copy() -> str:
        return "copied"

    assert asyncio.run(run_legs(save(), copy())) == ("saved", "copied")


def test_copy_failure_waits_for_the_save_to_finish() -> None:
    events: list[str] = []

    async def scenario() -> None:
        copy_failed = asyncio.Event()

        async def save() -> None:
            try:
                await copy_failed.wait()  # still saving when the copy fails
                await asyncio.sleep(0)  # a cancel, if the runner sent one, lands here
                events.append("save finished")
            except asyncio.CancelledError:
                events.append("save cancelled")
                raise

        async def copy() -> None:
            events.append("copy failed")
            copy_failed.set()
            raise OSError(28, "No space left on device")

        with pytest.raises(LegFailed) as info:
            await run_legs(save(), copy())
        events.append("runner returned")
        assert info.value.leg == "copy" and "No space" in str(info.value)

    asyncio.run(scenario())
    assert events == ["copy failed", "save finished", "runner returned"]


def test_save_failure_cancels_the_copy() -> None:
    events: list[str] = []

    async def scenario() -> None:
        copying = asyncio.Event()

        async def save() -> None:
            await copying.wait()
            raise RuntimeError("migration failed")

        async def copy() -> None:
            copying.set()
            try:
                await asyncio.Event().wait()  # forever, unless cancelled
            except asyncio.CancelledError:
                events.append("copy cancelled")
                raise

        with pytest.raises(LegFailed) as info:
            await asyncio.wait_for(run_legs(save(), copy()), 30)  # a hang guard only
        assert info.value.leg == "save" and "migration failed" in str(info.value)

    asyncio.run(scenario())
    assert events == ["copy cancelled"]


def test_save_failure_stops_a_real_copy_thread(tmp_path: Path) -> None:
    """The copy leg is a copy_tree in a thread: cancellation must reach the thread, and
    the thread must have ended (partial copy removed) when the runner returns."""
    src = tmp_path / "vm"
    src.mkdir()
    for i in range(40):
        make_sparse(src / f"f{i}", 8 * MiB, [(0, 8 * MiB)], seed=i + 1)
    threads_before = threading.active_count()
    copying = threading.Event()
    files_copied: list[Path] = []

    def slow_disk(point: str, path: Path) -> None:
        copying.set()
        files_copied.append(path)
        time.sleep(0.01)  # a slow disk: the copy is still going when the save fails

    async def save() -> None:
        await asyncio.to_thread(copying.wait)
        raise RuntimeError("save broke")

    async def copy() -> None:
        await in_thread(lambda stop: copy_tree(src, tmp_path / "out", cancel=stop,
                                               fault=slow_disk))

    with pytest.raises(LegFailed, match="save broke"):
        asyncio.run(run_legs(save(), copy()))
    assert len(files_copied) < 40  # it was stopped, not left to finish
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert threading.active_count() <= threads_before + 1  # the worker thread is done


def test_cancelling_the_runner_ends_both_legs() -> None:
    ended: list[str] = []

    async def scenario() -> None:
        started = {name: asyncio.Event() for name in ("save", "copy")}

        async def leg(name: str) -> None:
            started[name].set()
            try:
                await asyncio.Event().wait()
            finally:
                ended.append(name)

        task = asyncio.create_task(run_legs(leg("save"), leg("copy")))
        for event in started.values():
            await event.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert sorted(ended) == ["copy", "save"]
