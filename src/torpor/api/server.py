"""`torpor serve`: the daemon. It owns one instance manager for a data root and serves
the API on a unix socket (0600, the default) or TCP. We bind the socket ourselves so it
is never world-accessible, not even for a moment (uvicorn would make it 0666)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import secrets
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from torpor.api.app import create_app
from torpor.api.listen import ListenAddress, address_family, daemon_listening
from torpor.config import Config
from torpor.errors import Busy, InvalidArgument
from torpor.manager import InstanceManager
from torpor.paths import UNIX_PATH_MAX, DataRoot

log = logging.getLogger("torpor.api")
TOKEN_BYTES = 32


def ensure_token(path: Path) -> str:
    """The bearer token: read it, or create it 0600 on first start."""
    with contextlib.suppress(FileNotFoundError):
        token = path.read_text().strip()
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, token.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    return token


def bind(address: ListenAddress) -> socket.socket:
    if address.unix_path is None:
        sock = socket.socket(address_family(address), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address.host or "", address.port or 0))
        except OSError as exc:
            sock.close()
            raise InvalidArgument(f"cannot listen on {address}: {exc.strerror}") from None
        return sock
    path = address.unix_path
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise InvalidArgument(f"socket path too long for a unix socket: {path}")
    if daemon_listening(address):
        raise Busy(f"a daemon is already listening on {path}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket: nothing answers on it
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return sock


@contextlib.contextmanager
def serving_alone(root: DataRoot) -> Iterator[None]:
    """The data root's daemon lock, for the daemon's life: a second daemon would run a
    second idle clock, restore pool, reaper and relay for the same instances."""
    path = root.daemon_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise Busy(f"another torpord (pid {holder}) serves the data root {root.root}"
                       ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # the lock goes with it


def serve(config: Config) -> None:
    root = config.root
    root.ensure()
    with serving_alone(root):
        _serve(config, root)


def _serve(config: Config, root: DataRoot) -> None:
    token = ensure_token(config.token_path)
    # Busy instead of waiting: a second client racing on an instance gets a 409 at once.
    manager = InstanceManager(root.root, config.settings(), lock_wait=0)
    for line in manager.recover_jobs():
        log.warning("compression: %s", line)
    # The safe repairs of `torpor check --repair`: a restarted daemon starts clean.
    for problem in asyncio.run(manager.check(repair=True)):
        log.warning("check: %s %s %s (%s)", "repaired" if problem.repaired else "left",
                    problem.kind, problem.path, problem.detail)
    address = config.listen_address
    sock = bind(address)
    sock.listen(128)
    log.warning("torpord listening on %s (data root %s)", address, root.root)
    server = uvicorn.Server(uvicorn.Config(create_app(manager, token), log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=30))
    # Everything imported and built so far lives as long as the daemon: out of the garbage
    # collector's sight (gc.freeze), a full collection, which runs on the event loop
    # between two steps of some request, scans only what requests made.
    gc.collect()
    gc.freeze()
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again for
    # the previous handler: make that a no-op so we return, remove the socket, exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if address.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                address.unix_path.unlink()
