"""The agent client turns any failure of its channel into AgentError, so callers that
retry (wait_ready) see one error type."""

import asyncio
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
        path = Path(tmp) / "agent.sock"
        server = serve_once(path, reply)

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
        asyncio.run(GuestAgent.wait_ready(tmp_path / "nothing.sock", 0.3))
