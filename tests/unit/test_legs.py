"""The leg runner's failure rules, with legs that fail on cue."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from tests.copy.helpers import MiB, make_sparse
from torpor.copy import CopyCancelled, copy_tree
from torpor.instances.legs import LegFailed, in_thread, run_legs


def test_both_legs_succeed() -> None:
    async def save() -> str:
        await asyncio.sleep(0.02)
        return "saved"

    async def copy() -> str:
        return "copied"

    assert asyncio.run(run_legs(save(), copy())) == ("saved", "copied")


def test_copy_failure_waits_for_the_save_to_finish() -> None:
    events: list[str] = []

    async def save() -> None:
        try:
            await asyncio.sleep(0.3)
            events.append("save finished")
        except asyncio.CancelledError:
            events.append("save cancelled")
            raise

    async def copy() -> None:
        await asyncio.sleep(0.01)
        events.append("copy failed")
        raise OSError(28, "No space left on device")

    async def scenario() -> None:
        with pytest.raises(LegFailed) as info:
            await run_legs(save(), copy())
        events.append("runner returned")
        assert info.value.leg == "copy" and "No space" in str(info.value)

    asyncio.run(scenario())
    assert events == ["copy failed", "save finished", "runner returned"]


def test_save_failure_cancels_the_copy_promptly() -> None:
    events: list[str] = []

    async def save() -> None:
        await asyncio.sleep(0.02)
        raise RuntimeError("migration failed")

    async def copy() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            events.append("copy cancelled")
            raise

    start = time.monotonic()
    with pytest.raises(LegFailed) as info:
        asyncio.run(run_legs(save(), copy()))
    assert info.value.leg == "save" and "migration failed" in str(info.value)
    assert events == ["copy cancelled"] and time.monotonic() - start < 2


def test_save_failure_stops_a_real_copy_thread(tmp_path: Path) -> None:
    """The copy leg is a copy_tree in a thread: cancellation must reach the thread, and
    the thread must have ended (partial copy removed) when the runner returns."""
    src = tmp_path / "vm"
    src.mkdir()
    for i in range(40):
        make_sparse(src / f"f{i}", 8 * MiB, [(0, 8 * MiB)], seed=i + 1)
    threads_before = threading.active_count()
    outcome: dict[str, object] = {}

    def slow_fault(point: str, path: Path) -> None:
        time.sleep(0.01)  # a slow disk

    async def save() -> None:
        await asyncio.sleep(0.1)
        raise RuntimeError("save broke")

    async def copy() -> None:
        try:
            await in_thread(lambda stop: copy_tree(src, tmp_path / "out", cancel=stop,
                                                   fault=slow_fault))
        except CopyCancelled as exc:  # pragma: no cover - either way is fine
            outcome["copy"] = exc
            raise

    start = time.monotonic()
    with pytest.raises(LegFailed, match="save broke"):
        asyncio.run(run_legs(save(), copy()))
    assert time.monotonic() - start < 5
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert threading.active_count() <= threads_before + 1  # the worker thread is done


def test_cancelling_the_runner_ends_both_legs() -> None:
    ended: list[str] = []

    async def leg(name: str) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            ended.append(name)

    async def scenario() -> None:
        task = asyncio.create_task(run_legs(leg("save"), leg("copy")))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert sorted(ended) == ["copy", "save"]
