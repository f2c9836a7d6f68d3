"""The agent client turns any failure of its channel into AgentError, so callers that
retry (wait_ready) see one error type."""

import asyncio
import json
import socket
import tempfile
from pathlib import Path

import pytest

from torpor.guest.agent import AgentError, GuestAgent


def serve_once(path: Path, reply: bytes) -> socket.socket:
    """A unix socket that accepts one client, sends `reply` and hangs up."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    return server


@pytest.mark.parametrize("reply", [b"", b"\xff{not json\n", b"\xff" + b"x" * 64])
def test_broken_channel_is_an_agent_error(reply: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="tp-ag-", dir="/tmp") as tmp:
        path = Path(tmp) / "agent"  # no FIFOs: the socket beside them (an older QEMU)
        server = serve_once(path.with_name("agent.sock"), reply)

        async def scenario() -> None:
            async def peer() -> None:
                conn, _ = await asyncio.get_running_loop().sock_accept(server)
                conn.sendall(reply)
                conn.close()

            server.setblocking(False)
            task = asyncio.create_task(peer())
            try:
                with pytest.raises(AgentError):
                    async with GuestAgent.connect(path, timeout=2):
                        pass
            finally:
                await task

        asyncio.run(scenario())
        server.close()


def test_wait_ready_gives_up_with_agent_error(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="did not answer within"):
        asyncio.run(GuestAgent.wait_ready(tmp_path / "nothing", 0.3))


def test_attached_is_best_effort_and_early_connection_answers_first() -> None:
    """`attached` yields None from a silent agent (a standby must not wait on it);
    `ready` syncs on the early connection instead of dialling again, and hands it on."""
    with tempfile.TemporaryDirectory(prefix="tp-ag-", dir="/tmp") as tmp:
        path = Path(tmp) / "agent"
        server = serve_once(path.with_name("agent.sock"), b"")
        server.setblocking(False)

        async def scenario() -> None:
            loop = asyncio.get_running_loop()

            async def silent_peer() -> socket.socket:
                conn, _ = await loop.sock_accept(server)
                return conn  # reads nothing, answers nothing

            silent = asyncio.create_task(silent_peer())
            async with GuestAgent.attached(path, timeout=0.2) as agent:
                assert agent is None
            (await silent).close()

            async def syncing_peer() -> int:
                conn, _ = await loop.sock_accept(server)
                request = json.loads((await loop.sock_recv(conn, 4096)).lstrip(b"\xff"))
                token = request["arguments"]["id"]
                await loop.sock_sendall(conn, b"\xff" + json.dumps({"return": token}).encode()
                                        + b"\n")
                conn.close()
                return int(token)

            peer = asyncio.create_task(syncing_peer())
            early = await GuestAgent.attach_early(path)
            assert early is not None
            assert await GuestAgent.ready(path, 2.0, early) is early
            await early.close()
            await peer  # the one connection the server accepted was the early one

        asyncio.run(scenario())
        server.close()


def test_a_cancelled_wait_for_the_agent_ends_even_when_the_cancel_is_swallowed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Python 3.11's wait_for can turn a cancellation into its inner result (a failed
    connect): ready() must still stop instead of retrying until its timeout."""
    async def connect_that_swallows_cancel(cls: object, path: Path, timeout: float) -> None:
        try:
            await asyncio.sleep(timeout)
        except asyncio.CancelledError:
            raise AgentError("cannot connect: the socket is gone") from None
        raise AgentError("cannot connect")

    monkeypatch.setattr(GuestAgent, "_open", classmethod(connect_that_swallows_cancel))

    async def scenario() -> None:
        waiter = asyncio.ensure_future(GuestAgent.ready(tmp_path / "agent", 30))
        await asyncio.sleep(0.1)
        waiter.cancel()
        # it ends cancelled; had it swallowed the cancel, it would still be retrying
        # (TimeoutError here) for the rest of its 30 s
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiter, 5)

    asyncio.run(scenario())
