"""Auth on every protected endpoint (enumerated from the OpenAPI document), the committed
document matching the served one, and the daemon's files and socket being private."""

from __future__ import annotations

import json
import re
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import Daemon, start_daemon, stop_daemon
from torpor.api.app import openapi_document

SPEC = Path(__file__).resolve().parents[2] / "openapi.json"
UNPROTECTED = {("get", "/healthz")}


def test_committed_openapi_matches_the_app() -> None:
    assert json.loads(SPEC.read_text()) == json.loads(openapi_document()), (
        "openapi.json is stale: regenerate it with `torpor openapi > openapi.json`")


def test_served_openapi_is_the_committed_one(api: httpx.Client) -> None:
    assert api.get("/openapi.json").json() == json.loads(SPEC.read_text())


def protected_operations() -> list[tuple[str, str]]:
    spec = json.loads(SPEC.read_text())
    found = [(method, path) for path, item in spec["paths"].items() for method in item
             if (method, path) not in UNPROTECTED]
    return [*found, ("get", "/openapi.json")]


@pytest.mark.parametrize("token", ["", "wrong-token"], ids=["missing", "wrong"])
def test_every_protected_endpoint_needs_the_token(daemon: Daemon, token: str) -> None:
    operations = protected_operations()
    assert len(operations) >= 20  # the enumeration really found the API
    with daemon.client(token=token) as client:
        for method, path in operations:
            url = re.sub(r"\{[^}]+\}", "x", path)
            response = client.request(method.upper(), url, json={})
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"


def test_health_needs_no_token(daemon: Daemon) -> None:
    with daemon.client(token="") as client:
        assert client.get("/healthz").json()["status"] == "ok"


def test_socket_and_token_are_private(daemon: Daemon) -> None:
    token = daemon.data_root / "api-token"
    sock = daemon.data_root / "torpord.sock"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600


def _serve(data_root: Path, listen: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torpor.cli.main", "--data-root",
                           str(data_root), "serve", "--listen", listen],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("socket_name", ["torpord.sock", "other.sock"])
def test_a_second_daemon_on_the_same_data_root_is_refused(daemon: Daemon,
                                                          socket_name: str) -> None:
    """Whatever it listens on: two would each run an idle clock, a restore pool and the
    published ports' relays for the same instances."""
    result = _serve(daemon.data_root, f"unix:{daemon.data_root / socket_name}")
    pid = daemon.process.pid
    assert (result.returncode, result.stderr) == (
        5, f"torpor: error: another torpord (pid {pid}) serves the data root"
           f" {daemon.data_root}\n")
    assert not (daemon.data_root / "other.sock").exists()


def test_a_second_daemon_on_the_same_socket_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    result = _serve(tmp_path, daemon.listen)  # another data root, the first one's socket
    path = daemon.listen.removeprefix("unix:")
    assert (result.returncode, result.stderr) == (
        5, f"torpor: error: a daemon is already listening on {path}\n")


def test_daemon_stops_cleanly_and_keeps_its_token() -> None:
    first = start_daemon()
    token, root = first.token, first.data_root
    first.process.terminate()
    assert first.process.wait(timeout=60) == 0
    assert not (root / "torpord.sock").exists()
    assert (root / "api-token").read_text().strip() == token
    stop_daemon(first)


def test_an_oversized_body_is_refused_before_it_is_read(daemon: Daemon) -> None:
    """150 MB declared, nothing sent: the answer (413) must come without the body, where
    the daemon used to read the whole body first (the client would wait forever here)."""
    path = daemon.listen.removeprefix("unix:")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(b"POST /instances/x/exec HTTP/1.1\r\nHost: torpord\r\n"
                     b"Authorization: Bearer " + daemon.token.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 157286400\r\n\r\n"
                     b'{"argv": ["')
        received = b""
        while chunk := sock.recv(4096):  # the daemon closes the connection after its answer
            received += chunk
        reply = received.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"code":"too_large"' in reply.replace(" ", "")


def test_a_chunked_body_over_the_cap_is_cut_off(api: httpx.Client) -> None:
    def chunks() -> object:
        for _ in range(20):
            yield b"x" * (1 << 20)

    response = api.post("/instances/x/exec", content=chunks(),  # type: ignore[arg-type]
                        headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["code"] == "too_large"


def test_the_daemon_sweeps_debris_of_killed_operations_when_it_starts(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="tpa-", dir="/tmp"))
    debris = [root / "tmp" / "fork-0123456789ab@4000000-1",
              root / "snapshots" / ".creating-0123456789ab@4000000-1",
              root / "instances" / ".deleting-0123456789ab@4000000-1"]
    for path in debris:
        (path / "payload").mkdir(parents=True)
    daemon = start_daemon(root=root)
    try:
        assert not [p for p in debris if p.exists()]
        assert "check: repaired staging" in (root / "torpord.log").read_text()
    finally:
        stop_daemon(daemon)
