"""The reaper: a tree handed to it is gone from its place when `remove` returns; while
the reaper runs, the rest of the removal happens after, and leaving `running` waits for
it."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from torpor import tasks
from torpor.fsutil import DELETING_PREFIX
from torpor.tasks import Reaper


def make_tree(root: Path) -> Path:
    tree = root / "state"
    (tree / "inner").mkdir(parents=True)
    (tree / "inner" / "data").write_bytes(b"x" * 4096)
    (tree / "manifest.json").write_text("{}")
    return tree


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_a_reaper_not_running_removes_before_returning(tmp_path: Path) -> None:
    tree = make_tree(tmp_path)
    asyncio.run(Reaper().remove(tree))
    assert leftovers(tmp_path) == []


def test_a_missing_tree_is_nothing_to_do(tmp_path: Path) -> None:
    asyncio.run(Reaper().remove(tmp_path / "never-was"))
    assert leftovers(tmp_path) == []


def test_a_running_reaper_returns_at_once_and_waits_for_the_removal_when_it_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = make_tree(tmp_path)
    removing, may_finish = threading.Event(), threading.Event()
    real_rmtree = tasks.shutil.rmtree

    def slow_rmtree(path: Path, ignore_errors: bool = False) -> None:
        removing.set()
        assert may_finish.wait(10)
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(tasks.shutil, "rmtree", slow_rmtree)
    seen: dict[str, list[str]] = {}

    async def scenario() -> None:
        reaper = Reaper()
        assert not reaper.active
        async with reaper.running():
            assert reaper.active  # a restore then leaves its state to it (restore.py)
            await reaper.remove(tree)
            seen["returned"] = leftovers(tmp_path)
            assert await asyncio.to_thread(removing.wait, 10)
            may_finish.set()
        seen["stopped"] = leftovers(tmp_path)
        assert not reaper.active

    asyncio.run(scenario())
    # set aside, not yet removed, when remove() returned; gone once the reaper stopped
    assert len(seen["returned"]) == 1 and seen["returned"][0].startswith(DELETING_PREFIX)
    assert seen["stopped"] == []


def test_settled_waits_for_the_removals_below_a_path_and_no_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An instance's next operation waits for what its last one left (Registry.locked),
    not for another instance's removals."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    ours, theirs = make_tree(mine), make_tree(other)
    released = {ours.parent: threading.Event(), theirs.parent: threading.Event()}
    started = threading.Semaphore(0)
    real_rmtree = tasks.shutil.rmtree

    def held_rmtree(path: Path, ignore_errors: bool = False) -> None:
        started.release()
        assert released[Path(path).parent].wait(10)
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(tasks.shutil, "rmtree", held_rmtree)
    order: list[str] = []

    async def scenario() -> None:
        reaper = Reaper()
        async with reaper.running():
            await reaper.remove(ours)
            await reaper.remove(theirs)
            for _ in range(2):
                assert await asyncio.to_thread(started.acquire, True, 10)
            await reaper.settled(tmp_path / "elsewhere")  # nothing below it: at once
            order.append("elsewhere settled")
            waiting = asyncio.ensure_future(reaper.settled(mine))
            for _ in range(3):  # the wait has begun (one turn would end a wrong one)
                await asyncio.sleep(0)
            assert not waiting.done()  # its removal is held
            released[theirs.parent].set()
            await reaper.settled(other)
            assert leftovers(other) == []
            assert not waiting.done()  # the other's ending changes nothing
            order.append("mine still pending")
            released[ours.parent].set()
            await waiting
            order.append("mine settled")
            assert leftovers(mine) == []

    asyncio.run(scenario())
    assert order == ["elsewhere settled", "mine still pending", "mine settled"]
