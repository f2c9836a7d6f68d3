"""A real torpord per test module: the daemon runs as its own process on a temporary
data root and is reached through its socket, as users reach it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

STARTUP_TIMEOUT = 30.0


@dataclass
class Daemon:
    data_root: Path
    listen: str
    token: str
    process: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        return "http://torpord" if self.listen.startswith("unix:") else f"http://{self.listen}"

    def client(self, token: str | None = None, timeout: float = 180) -> httpx.Client:
        transport = (httpx.HTTPTransport(uds=self.listen[len("unix:"):])
                     if self.listen.startswith("unix:") else httpx.HTTPTransport())
        headers = {} if token == "" else {"Authorization": f"Bearer {token or self.token}"}
        return httpx.Client(transport=transport, base_url=self.base_url, headers=headers,
                            timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# The network rule: a daemon under test reaches registries on loopback only. Anything else
# goes to this proxy, where nothing listens (Go, hence skopeo, never proxies loopback).
NOWHERE_PROXY = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}


def start_daemon(listen: str | None = None, root: Path | None = None,
                 env: dict[str, str] | None = None) -> Daemon:
    """`env`: added to ours."""
    root = root or Path(tempfile.mkdtemp(prefix="tpa-", dir="/tmp"))
    listen = listen or f"unix:{root}/torpord.sock"
    env = dict(os.environ, TORPOR_DATA_ROOT=str(root), **NOWHERE_PROXY, **(env or {}))
    # S3 (snapshot push/pull): a test's own server if it set one, else a loopback port
    # where nothing listens; never a cloud's metadata address for credentials.
    env.setdefault("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.setdefault("AWS_MAX_ATTEMPTS", "1")
    log = open(root / "torpord.log", "wb")  # noqa: SIM115 - the daemon's lifetime
    process = subprocess.Popen([sys.executable, "-m", "torpor.cli.main", "serve",
                                "--listen", listen], env=env, stdout=log, stderr=log)
    daemon = Daemon(root, listen, "", process)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, (root / "torpord.log").read_text()
        token_file = root / "api-token"
        if token_file.exists() and token_file.read_text().strip():
            daemon.token = token_file.read_text().strip()
            try:
                with daemon.client() as c:
                    if c.get("/healthz").status_code == 200:
                        return daemon
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    stop_daemon(daemon)
    raise AssertionError("torpord did not come up: " + (root / "torpord.log").read_text())


def stop_daemon(daemon: Daemon) -> int | None:
    """Delete what the test left, stop the daemon (SIGTERM), remove its data root."""
    returncode = None
    try:
        if daemon.process.poll() is None:
            with daemon.client() as c:
                for info in c.get("/instances").json():
                    c.delete(f"/instances/{info['name']}", params={"force": True})
            daemon.process.send_signal(signal.SIGTERM)
            returncode = daemon.process.wait(timeout=60)
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        subprocess.run(["pkill", "-KILL", "-f", f"{daemon.data_root}/instances"], check=False)
        shutil.rmtree(daemon.data_root, ignore_errors=True)
    return returncode


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    d = start_daemon()
    yield d
    stop_daemon(d)


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.client() as client:
        yield client
