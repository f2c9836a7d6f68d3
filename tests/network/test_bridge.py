"""Bridged guests, each test in a network namespace it creates (the network rule): torpor,
its QEMUs and the clients run inside it through `ip netns exec`; the namespace, with
its bridge and TAPs, is deleted afterwards. Nothing touches the machine's own namespace."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import run
from tests.network.conftest import Namespace
from tests.oci_helpers import free_port
from torpor.errors import Busy, TorporError
from torpor.instances import InstanceState
from torpor.instances.context import Settings
from torpor.manager import InstanceManager

pytestmark = pytest.mark.qemu


def test_bridged_guests_have_their_own_addresses_and_cannot_reach_each_other(
        netns: Namespace) -> None:
    for name in ("a", "b"):
        netns.torpor("create", name, "--network", "bridge")
        netns.torpor("start", name)
        netns.serve(name, f"i-am-{name}")
    a, b = netns.ip("a"), netns.ip("b")
    assert a != b and a.startswith("10.213.0.") and b.startswith("10.213.0.")
    assert netns.http_get(f"http://{a}:8080/") == "i-am-a\n"
    assert netns.http_get(f"http://{b}:8080/") == "i-am-b\n"
    # isolated bridge ports: a cannot reach b (but does reach the bridge, its gateway)
    assert netns.guest_get("b", b, 8080).stdout.endswith("i-am-b\n")  # the probe works
    blocked = netns.guest_get("a", b, 8080)
    assert blocked.returncode != 0 and blocked.stdout == "", blocked
    assert netns.sh("a", "ping -c 1 -W 3 10.213.0.1").returncode == 0
    listing = netns.torpor("list").stdout
    assert a in listing and b in listing


SERVE_ADDRESS = """
import http.server, sys
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Echo).serve_forever()
"""


def test_guests_reach_the_outside_through_nat_but_not_the_hosts_own_services(
        netns: Namespace) -> None:
    """`outside` is a second namespace joined to the test's by a veth pair: a server
    there sees the guest's traffic come from the host's address (masquerade). A server
    on the host itself, on a port nobody published, is out of the guest's reach."""
    outside = f"{netns.name}-out"
    subprocess.run(["ip", "netns", "add", outside], check=True)
    servers = []
    try:
        netns.run("ip", "link", "add", "veth-in", "type", "veth", "peer", "name", "veth-out",
                  "netns", outside)
        netns.run("ip", "addr", "add", "198.51.100.1/24", "dev", "veth-in")
        netns.run("ip", "link", "set", "veth-in", "up")
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "addr", "add", "198.51.100.2/24", "dev", "veth-out"],
                    ["ip", "link", "set", "veth-out", "up"]):
            subprocess.run(["ip", "netns", "exec", outside, *cmd], check=True)
        servers.append(subprocess.Popen(["ip", "netns", "exec", outside, sys.executable,
                                         "-c", SERVE_ADDRESS, "198.51.100.2", "8000"]))
        servers.append(subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable,
                                         "-c", SERVE_ADDRESS, "0.0.0.0", "9999"]))
        netns.torpor("create", "g", "--network", "bridge")
        netns.torpor("start", "g")
        seen = netns.guest_get("g", "198.51.100.2", 8000)
        # masqueraded: the server saw the host's address, not the guest's
        assert seen.returncode == 0 and seen.stdout.endswith("\n\n198.51.100.1"), seen
        # the host's own service: reachable from the host, not from the guest
        assert netns.http_get("http://10.213.0.1:9999/")  # it answers the host
        blocked = netns.guest_get("g", "10.213.0.1", 9999)
        assert blocked.returncode != 0 and "timed out" in blocked.stderr, blocked
    finally:
        for server in servers:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", outside], check=False)


def test_a_fork_gets_a_new_address_and_both_answer(netns: Namespace) -> None:
    netns.torpor("create", "src", "--network", "bridge")
    netns.torpor("start", "src")
    netns.serve("src", "served")
    netns.torpor("fork", "src", "copy")
    src, copy = netns.ip("src"), netns.ip("copy")
    assert src != copy
    assert netns.http_get(f"http://{src}:8080/") == "served\n"
    assert netns.http_get(f"http://{copy}:8080/") == "served\n"
    assert copy in netns.sh("copy", "ip -4 addr show eth0").stdout
    # delete frees the address and removes the TAP
    copy_id = str(netns.show("copy")["id"])
    netns.torpor("delete", "--force", "copy")
    leases = json.loads((netns.data_root / "network" / "leases.json").read_text())
    assert copy not in leases and src in leases
    assert netns.run("ip", "link", "show", f"tp{copy_id}", check=False).returncode != 0


ECHO_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7000), timeout=10)
for line in sys.stdin:
    c.sendall(line.encode())
    c.settimeout(60)
    got = b""
    while not got.endswith(b"\\n"):
        got += c.recv(100)
    print(got.decode(), end="", flush=True)
"""


@pytest.mark.parametrize("backing", ["anonymous", "file"])
def test_a_connection_survives_standby_and_restore(netns: Namespace, backing: str) -> None:
    netns.torpor("create", "echo", "--network", "bridge", "--memory-backing", backing)
    netns.torpor("start", "echo")
    netns.sh("echo", "(nc -l -p 7000 -e cat </dev/null >/dev/null 2>&1 &)")
    client = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, sys.executable, "-c", ECHO_CLIENT,
         netns.ip("echo")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    try:
        client.stdin.write("before\n")
        client.stdin.flush()
        assert client.stdout.readline() == "before\n"
        netns.torpor("standby", "echo")
        assert netns.show("echo")["state"] == "standby"
        netns.torpor("restore", "echo")
        client.stdin.write("after\n")  # the same TCP connection, carried on
        client.stdin.flush()
        assert client.stdout.readline() == "after\n"
    finally:
        client.kill()
        client.wait()


def test_an_exhausted_pool_is_one_error_and_leaves_nothing(tmp_path: Path) -> None:
    """No namespace needed: addresses are handed out at create, TAPs only at start."""
    manager = InstanceManager(tmp_path / "root", Settings(accel="tcg",
                                                          network_subnet="10.99.0.0/30"))
    run(manager.create("one", network="bridge"))  # .1 is the bridge's, .2 this one's
    with pytest.raises(Busy, match=r"no free address in 10.99.0.0/30"):
        run(manager.create("two", network="bridge"))
    assert [i.name for i in run(manager.list_all())] == ["one"]
    leases = json.loads((tmp_path / "root" / "network" / "leases.json").read_text())
    assert list(leases) == ["10.99.0.2"]
    run(manager.delete("one"))
    run(manager.create("two", network="bridge"))  # its address came back
    assert run(manager.get("two")).network.ip == "10.99.0.2"  # type: ignore[union-attr]


def test_check_releases_the_address_of_an_instance_a_crash_deleted(tmp_path: Path) -> None:
    """A delete killed after the instance's directory went, before its address did."""
    manager = InstanceManager(tmp_path / "root", Settings(accel="tcg",
                                                          network_subnet="10.99.0.0/30"))
    leases = tmp_path / "root" / "network" / "leases.json"
    leases.parent.mkdir(parents=True)
    leases.write_text(json.dumps({"10.99.0.2": "0123456789ab"}))
    with pytest.raises(Busy):
        run(manager.create("one", network="bridge"))
    found = run(manager.check())
    assert [(p.kind, p.detail) for p in found] == [
        ("orphaned-address", "leased to deleted instance 0123456789ab")]
    repaired = run(manager.check(repair=True))
    assert [p.repaired for p in repaired] == [True]
    assert json.loads(leases.read_text()) == {}
    run(manager.create("one", network="bridge"))


CONNECTS = ("import socket; c = socket.create_connection(('127.0.0.1', 18080), timeout=5); "
            "print('connected')")


@pytest.mark.parametrize("mode", ["bridge", "user"])
def test_a_published_port_serves_across_standby_and_is_freed_at_stop(
        netns: Namespace, mode: str) -> None:
    """One mechanism in both modes: the relay holds the port, also while the VM sleeps
    (a connection is accepted, not refused: what waking on traffic builds on)."""
    netns.torpor("create", "pub", "--network", mode, "--publish", "18080:8080")
    netns.torpor("start", "pub")
    netns.serve("pub", "published")
    assert netns.http_get("http://127.0.0.1:18080/") == "published\n"
    assert netns.show("pub")["network"]["published"] == ["127.0.0.1:18080:8080/tcp"]  # type: ignore[index]
    netns.torpor("standby", "pub")
    assert netns.run(sys.executable, "-c", CONNECTS).stdout == "connected\n"
    netns.torpor("restore", "pub")
    assert netns.http_get("http://127.0.0.1:18080/") == "published\n"
    netns.torpor("fork", "pub", "pub-copy")  # a host port has one owner: the source's
    assert netns.show("pub-copy")["network"]["published"] == []  # type: ignore[index]
    assert netns.http_get("http://127.0.0.1:18080/") == "published\n"
    netns.torpor("stop", "pub")
    refused = netns.run(sys.executable, "-c", "import socket; socket.create_connection("
                        "('127.0.0.1', 18080), timeout=5)", check=False)
    assert "ConnectionRefusedError" in refused.stderr, refused.stderr


def test_bad_publish_requests_are_one_error_and_create_nothing(netns: Namespace) -> None:
    bad = netns.torpor("create", "x", "--network", "bridge", "--publish", "80:abc",
                       check=False)
    assert bad.returncode == 2 and "use [HOST_IP:]HOST_PORT:GUEST_PORT" in bad.stderr
    assert bad.stderr.count("\n") == 1, bad.stderr
    holder = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c",
                               "import socket, time; s = socket.socket(); "
                               "s.bind(('127.0.0.1', 18081)); s.listen(); "
                               "print('bound', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "bound\n"
        taken = netns.torpor("create", "x", "--network", "bridge", "--publish", "18081:80",
                             check=False)
        assert taken.returncode == 5 and "cannot publish 127.0.0.1:18081" in taken.stderr
    finally:
        holder.kill()
        holder.wait()
    netns.torpor("create", "first", "--network", "bridge", "--publish", "18082:80")
    twice = netns.torpor("create", "x", "--network", "bridge", "--publish", "18082:80",
                         check=False)
    assert twice.returncode == 5 and "published by instance first" in twice.stderr
    assert json.loads(netns.torpor("list", "--json").stdout)[0]["name"] == "first"
    assert len(json.loads(netns.torpor("list", "--json").stdout)) == 1
    leases = json.loads((netns.data_root / "network" / "leases.json").read_text())
    assert len(leases) == 1  # no address left allocated by the refused creates


UPSTREAM_DNS = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=5353",
                "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                "--address=/svc.example.test/192.0.2.80"]


def test_guests_resolve_through_the_bridge_and_the_last_delete_leaves_nothing(
        netns: Namespace) -> None:
    """The guest asks its gateway; the bridge's dnsmasq forwards to `network.dns` (here a
    second dnsmasq on the namespace's loopback that knows one name). Deleting the last
    bridged instance removes the bridge, its rules and its DNS."""
    upstream = subprocess.Popen(["ip", "netns", "exec", netns.name, *UPSTREAM_DNS],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        netns.env["TORPOR_NETWORK_DNS"] = "127.0.0.1#5353"
        netns.torpor("create", "dns", "--network", "bridge")
        netns.torpor("start", "dns")
        # (busybox nslookup also asks for AAAA, which the upstream refuses: exit 1)
        answer = netns.sh("dns", "nslookup svc.example.test", check=False).stdout
        assert "Address: 192.0.2.80" in answer, answer
        missing = netns.sh("dns", "nslookup nothing.example.test", check=False)
        assert "192.0.2.80" not in missing.stdout
        pid_file = netns.data_root / "network" / "dns-torpor0.pid"
        pid = int(pid_file.read_text())
        assert _alive(pid)
        netns.torpor("delete", "--force", "dns")
        assert netns.run("ip", "link", "show", "torpor0", check=False).returncode != 0
        assert netns.run("nft", "list", "tables").stdout == ""
        assert not pid_file.exists() and not _alive(pid)
    finally:
        upstream.kill()
        upstream.wait()


def _alive(pid: int) -> bool:
    """Running, not a zombie (an exited daemon waits for PID 1 to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_peers_reach_each_other_and_only_each_other(netns: Namespace) -> None:
    for name in ("p1", "p2"):
        netns.torpor("create", name, "--network", "bridge", "--allow-peers")
    netns.torpor("create", "iso", "--network", "bridge")
    for name in ("p1", "p2", "iso"):
        netns.torpor("start", name)
        netns.serve(name, f"i-am-{name}")
    p1, p2, iso = netns.ip("p1"), netns.ip("p2"), netns.ip("iso")
    assert netns.guest_get("p1", p2, 8080).stdout.endswith("i-am-p2\n")
    assert netns.guest_get("p2", p1, 8080).stdout.endswith("i-am-p1\n")
    assert "i-am-iso" not in netns.guest_get("p1", iso, 8080).stdout
    assert "i-am-p1" not in netns.guest_get("iso", p1, 8080).stdout
    assert netns.show("p1")["network"]["allow_peers"] is True  # type: ignore[index]
    # A fork of a peer is a peer too (its own address, the same opt-in).
    netns.torpor("fork", "p1", "p1-copy")
    assert netns.guest_get("p2", netns.ip("p1-copy"), 8080).stdout.endswith("i-am-p1\n")
    bad = netns.torpor("create", "u", "--allow-peers", check=False)
    assert bad.returncode == 2 and "--allow-peers needs --network bridge" in bad.stderr


def _nft_tables(netns: Namespace) -> str:
    return netns.run("nft", "list", "tables").stdout


GATEWAY = "10.213.0.1"
HOST_SERVICE = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 18099)); s.listen(); print("listening", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"host-service\\n"); c.close()
"""


def test_check_puts_the_bridge_right_after_a_crash_and_a_flush(netns: Namespace) -> None:
    """What a crashed torpor or a firewall reload can leave: a TAP no instance has, the
    rules flushed, the DNS killed; and a bridge with no instance at all."""
    netns.torpor("create", "g", "--network", "bridge")
    netns.torpor("start", "g")
    netns.run("ip", "tuntap", "add", "tp0123456789ab", "mode", "tap")
    netns.run("ip", "link", "set", "tp0123456789ab", "master", "torpor0")
    netns.run("nft", "flush", "ruleset")
    pid = (netns.data_root / "network" / "dns-torpor0.pid").read_text().strip()
    netns.run("kill", pid)
    found = json.loads(netns.torpor("check", "--json", check=False).stdout)
    kinds = sorted(p["kind"] for p in found["problems"])
    assert kinds == ["bridge-services", "orphaned-tap"], found
    netns.torpor("check", "--repair")
    assert netns.run("ip", "link", "show", "tp0123456789ab", check=False).returncode != 0
    assert "inet torpor_torpor0" in _nft_tables(netns)
    assert "bridge torpor_torpor0" in _nft_tables(netns)
    netns.torpor("check")  # nothing left to report: rules and DNS are back
    # The rules are in force again: the guest reaches no unpublished host port.
    service = subprocess.Popen(["ip", "netns", "exec", netns.name, sys.executable, "-c",
                                HOST_SERVICE], stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout is not None and service.stdout.readline() == "listening\n"
        probe = f"nc -w 3 {GATEWAY} 18099 </dev/null"
        assert "host-service" not in netns.sh("g", probe, check=False).stdout
        netns.run("nft", "flush", "ruleset")  # the probe can see the service without them
        assert "host-service" in netns.sh("g", probe, check=False).stdout
    finally:
        service.kill()
        service.wait()
    netns.torpor("delete", "--force", "g")
    netns.run("ip", "link", "add", "torpor0", "type", "bridge")  # left by a crash
    found = json.loads(netns.torpor("check", "--json", check=False).stdout)
    assert [p["kind"] for p in found["problems"]] == ["idle-bridge"]
    netns.torpor("check", "--repair")
    assert netns.run("ip", "link", "show", "torpor0", check=False).returncode != 0


def test_an_image_instance_on_the_bridge_serves_on_its_address_and_published_port(
        netns: Namespace, image_layout: Path) -> None:
    """An OCI image's init sets the address and resolver from the same kernel argument
    as the built-in guest's."""
    netns.torpor("image", "import", f"{image_layout}:web", "--as", "test/web:1")
    netns.torpor("create", "web", "--image", "test/web:1", "--network", "bridge",
                 "--publish", "18090:8080")
    netns.torpor("start", "web")
    address = netns.ip("web")
    assert netns.torpor("exec", "web", "--", "cat", "/etc/resolv.conf").stdout == \
        f"nameserver {GATEWAY}\n"
    assert _eventually(lambda: netns.http_get(f"http://{address}:8080/")) == \
        "hello from the image\n"
    assert netns.http_get("http://127.0.0.1:18090/") == "hello from the image\n"
    netns.torpor("standby", "web")
    netns.torpor("restore", "web")
    assert netns.http_get("http://127.0.0.1:18090/") == "hello from the image\n"


def _eventually(fetch: Callable[[], str], timeout: float = 30) -> str:
    """The image's server binds its port a little after the agent answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fetch()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_start_that_fails_publishes_nothing(manager: InstanceManager,
                                              fresh_name: str) -> None:
    """The relay is up before QEMU starts; a QEMU that cannot start (here: its disk is
    immutable, so it cannot open it for writing) takes it down again, so a stopped
    instance holds no host port."""
    port = free_port()
    run(manager.create(fresh_name, publish=[f"{port}:8080"]))
    paths = manager.paths(fresh_name)
    subprocess.run(["chattr", "+i", str(paths.disk)], check=True)
    try:
        with pytest.raises(TorporError, match="QEMU failed to start"):
            run(manager.start(fresh_name))
    finally:
        subprocess.run(["chattr", "-i", str(paths.disk)], check=True)
    assert run(manager.get(fresh_name)).state is InstanceState.STOPPED
    assert (paths.publish_dir / "targets.json").exists()  # the relay had been set up
    assert not paths.publisher_identity.exists()
    with socket.socket() as sock:  # the port is free again
        sock.bind(("127.0.0.1", port))
    run(manager.delete(fresh_name))
