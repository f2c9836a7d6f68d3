import asyncio
from pathlib import Path

import pytest

from torpor.errors import Busy
from torpor.instances.locking import file_lock


def test_second_holder_waits_or_fails(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"

    async def scenario() -> list[str]:
        events: list[str] = []

        async def holder() -> None:
            async with file_lock(lock, what="x"):
                events.append("a-in")
                await asyncio.sleep(0.3)
                events.append("a-out")

        async def waiter() -> None:
            await asyncio.sleep(0.05)
            with pytest.raises(Busy):
                async with file_lock(lock, what="x", wait=0):
                    pass
            async with file_lock(lock, what="x"):
                events.append("b-in")

        await asyncio.gather(holder(), waiter())
        return events

    assert asyncio.run(scenario()) == ["a-in", "a-out", "b-in"]
