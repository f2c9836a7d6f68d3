"""The network tests' namespace: each test that uses a bridge, a TAP or a guest address
makes its own (`ip netns add`), runs torpor, its QEMUs (and a daemon, for the idle
tests) and the clients inside it through `ip netns exec`, and deletes it afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_counter = iter(range(1000))


@dataclass
class Namespace:
    name: str
    data_root: Path
    env: dict[str, str] = field(default_factory=dict)  # torpor's settings, for this test

    def run(self, *argv: str, check: bool = True, timeout: float = 180,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["ip", "netns", "exec", self.name, *argv], input=input,
                                capture_output=True, text=True, timeout=timeout, check=False,
                                env=dict(os.environ, TORPOR_DATA_ROOT=str(self.data_root),
                                         **self.env))
        if check:
            assert result.returncode == 0, (argv, result.stdout, result.stderr)
        return result

    def torpor(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "torpor.cli.main", "--local", *args, check=check)

    def show(self, name: str) -> dict[str, object]:
        info: dict[str, object] = json.loads(self.torpor("show", name, "--json").stdout)
        return info

    def ip(self, name: str) -> str:
        network = self.show(name)["network"]
        assert isinstance(network, dict)
        return str(network["ip"])

    def sh(self, name: str, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.torpor("exec", name, "--", "sh", "-c", script, check=check)

    def http_get(self, url: str) -> str:
        """From the namespace's host side (the bridge's address)."""
        return self.run(sys.executable, "-c", "import sys, urllib.request; print(urllib.re"
                        f"quest.urlopen('{url}', timeout=10).read().decode(), end='')").stdout

    def guest_get(self, name: str, host: str, port: int) -> subprocess.CompletedProcess[str]:
        """An HTTP GET from inside a guest, by busybox nc (the default guest's static
        busybox wget crashes on its name-service lookup), 3 s at most."""
        return self.sh(name, f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} {port}",
                       check=False)

    def serve(self, name: str, text: str) -> None:
        self.sh(name, f"mkdir -p /tmp/www && echo {text} > /tmp/www/index.html && "
                      "httpd -p 8080 -h /tmp/www")


@pytest.fixture
def netns() -> Iterator[Namespace]:
    name = f"tp{os.getpid()}-{next(_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    root = Path(tempfile.mkdtemp(prefix="tpn-", dir="/tmp"))
    ns = Namespace(name, root)
    ns.run("ip", "link", "set", "lo", "up")
    try:
        yield ns
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                              text=True, check=False).stdout.split()
        subprocess.run(["kill", "-KILL", *pids], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", name], check=False)
        subprocess.run(["rm", "-rf", str(root)], check=False)


