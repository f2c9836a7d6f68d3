"""The agent's port as a `pipe` chardev: FIFOs the test holds open the way QEMU does
(read-write), with a minimal qemu-ga answering on them. What QEMU and the guest do with
it is covered by every integration test that runs a guest command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from torpor.guest.agent import AgentError, GuestAgent
from torpor.hypervisor.vmconfig import pipe_fifos


@contextlib.asynccontextmanager
async def qemu_side(pipe: Path, seen: list[bytes]) -> AsyncIterator[int]:
    """The FIFOs made and held read-write (as QEMU holds them), and an agent answering
    guest-sync-delimited and guest-ping; every request line it read goes into `seen`.
    Yields the reply FIFO's descriptor (to plant stale replies in it)."""
    requests, replies = pipe_fifos(pipe)
    os.mkfifo(requests)
    os.mkfifo(replies)
    request_fd = os.open(requests, os.O_RDWR | os.O_NONBLOCK)
    reply_fd = os.open(replies, os.O_RDWR | os.O_NONBLOCK)
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(request_fd, readable.set)

    async def agent() -> None:
        pending = b""
        while True:
            await readable.wait()
            readable.clear()
            with contextlib.suppress(BlockingIOError):
                pending += os.read(request_fd, 65536)
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                seen.append(line)
                request = json.loads(line.lstrip(b"\xff"))  # 0xFF: a parser flush
                if request["execute"] == "guest-sync-delimited":
                    answer = b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode()
                else:
                    answer = json.dumps({"return": {}}).encode()
                os.write(reply_fd, answer + b"\n")

    task = asyncio.create_task(agent())
    try:
        yield reply_fd
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        loop.remove_reader(request_fd)
        os.close(request_fd)
        os.close(reply_fd)


def test_a_session_over_the_fifos_flushes_the_parser_and_skips_stale_replies(
        tmp_path: Path) -> None:
    pipe, seen = tmp_path / "agent", []

    async def scenario() -> None:
        async with qemu_side(pipe, seen) as reply_fd:
            # what a client that was killed mid-session left in the reply FIFO
            os.write(reply_fd, b'\xff{"return": 7}\n{"return": {"pid": 1}}\n')
            async with GuestAgent.connect(pipe, timeout=2) as agent:
                await agent.ping()

    asyncio.run(scenario())
    assert seen[0].startswith(b'\xff{"execute": "guest-sync-delimited"'), seen
    assert json.loads(seen[1]) == {"execute": "guest-ping"}


def test_one_client_at_a_time_and_the_next_once_it_is_done(tmp_path: Path) -> None:
    """QEMU serves its socket to one client at a time; the lock on the request FIFO
    does the same: a second client waits its timeout out, then gets in after the first."""
    pipe, seen = tmp_path / "agent", []

    async def scenario() -> None:
        async with qemu_side(pipe, seen):
            async with GuestAgent.connect(pipe, timeout=2) as first:
                with pytest.raises(AgentError, match="busy with another client"):
                    async with GuestAgent.connect(pipe, timeout=0.2):
                        pass
                await first.ping()
            async with GuestAgent.connect(pipe, timeout=0.2) as second:
                await second.ping()

    asyncio.run(scenario())


def test_fifos_nobody_holds_are_an_agent_error_at_once(tmp_path: Path) -> None:
    """What an exited QEMU leaves: the FIFOs with no reader (ENXIO), not a hang."""
    pipe = tmp_path / "agent"
    for fifo in pipe_fifos(pipe):
        os.mkfifo(fifo)
    with pytest.raises(AgentError, match="cannot open the guest agent port"):
        asyncio.run(GuestAgent.wait_ready(pipe, 0.3))


def test_a_port_half_replaced_by_a_new_launch_is_an_agent_error(tmp_path: Path) -> None:
    """A restore's launch removes and remakes the FIFOs: a client that opened the
    request FIFO just before finds no reply FIFO. An AgentError (the daemon answered 500
    to this once, in the soak test), not an OSError."""
    pipe = tmp_path / "agent"
    requests, _ = pipe_fifos(pipe)
    os.mkfifo(requests)
    held = os.open(requests, os.O_RDWR | os.O_NONBLOCK)  # as QEMU holds it
    try:
        with pytest.raises(AgentError, match="cannot open the guest agent port"):
            asyncio.run(GuestAgent.wait_ready(pipe, 0.3))
    finally:
        os.close(held)
