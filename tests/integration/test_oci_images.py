"""OCI images booted: pulled from Debian's docker-registry on loopback, run with torpor's
kernel, init and agent; their command serves, `exec` runs in their root, `logs` has their
output, and standby/restore (compressed, memory-file) and fork keep them serving."""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run, torpor_cli
from tests.oci_helpers import debian_image, distroless_image, free_port, push
from torpor.codec import Codec
from torpor.hypervisor.vmconfig import PortForward
from torpor.images.source import OciSource
from torpor.instances import InstanceState
from torpor.instances.metadata import CompressionPolicy
from torpor.manager import InstanceManager

pytestmark = pytest.mark.qemu


def http_get(port: int, timeout: float = 30.0) -> str:
    """The page, once the guest's server listens (the agent answers before the image's
    command has necessarily bound its port)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/")
            body = conn.getresponse().read().decode()
            conn.close()
            return body
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def guest(manager: InstanceManager, name: str, *argv: str) -> tuple[int, str]:
    result = run(manager.exec(name, list(argv)))
    return result.exit_code, result.stdout.decode() + result.stderr.decode()


def wait_for_log(manager: InstanceManager, name: str, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := run(manager.logs(name)).decode()):
        assert time.monotonic() < deadline, f"{text!r} not in the logs: {log!r}"
        time.sleep(0.1)
    return log


@pytest.fixture(scope="module")
def web_image(registry: str, image_layout: Path) -> str:
    ref = f"{registry}/test/web:1"
    push(image_layout, "web", ref)
    return ref


@pytest.fixture
def web_instance(manager: InstanceManager, web_image: str,
                 fresh_name: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    run(manager.create(fresh_name, oci=OciSource(reference=web_image, env=["EXTRA=yes"]),
                       port_forwards=[PortForward(host_port=port, guest_port=8080)]))
    run(manager.start(fresh_name))
    yield fresh_name, port
    run(manager.delete(fresh_name, force=True))


def test_busybox_image_serves_runs_exec_and_logs(manager: InstanceManager,
                                                 web_instance: tuple[str, int],
                                                 web_image: str) -> None:
    name, port = web_instance
    assert http_get(port) == "hello from the image\n"
    code, env = guest(manager, name, "env")
    assert code == 0
    assert {"GREETING=hello from the image", "EXTRA=yes", f"HOSTNAME={name}"} <= set(
        env.split("\n")), env
    assert guest(manager, name, "cat", "/www/index.html") == (0, "hello from the image\n")
    assert guest(manager, name, "test", "-e", "/etc/deleteme")[0] == 1  # the whiteout
    assert guest(manager, name, "ls", "/.torpor/bin/qemu-ga")[0] == 0
    assert "serving on 8080" in wait_for_log(manager, name, "serving on 8080")
    info = run(manager.get(name))
    assert (info.image, info.image_digest) == (web_image, run(manager.image_list())[0].digest)
    shown = torpor_cli(manager.data_root.root, "show", name)
    assert web_image in shown.stdout and info.image_digest in shown.stdout


def test_image_instance_keeps_serving_across_compressed_standby_and_restore(
        manager: InstanceManager, web_instance: tuple[str, int]) -> None:
    name, port = web_instance
    http_get(port)
    guest(manager, name, "sh", "-c", "echo in-ram > /run/marker")
    run(manager.standby(name, policy=CompressionPolicy(codec=Codec.ZSTD, level=1)))
    assert run(manager.get(name)).state is InstanceState.STANDBY
    run(manager.restore(name))
    assert http_get(port) == "hello from the image\n"
    assert guest(manager, name, "cat", "/run/marker") == (0, "in-ram\n")  # the same boot


def test_fork_of_an_image_instance_serves_under_its_own_name(
        manager: InstanceManager, web_image: str, fresh_name: str) -> None:
    run(manager.create(fresh_name, oci=OciSource(reference=web_image)))
    run(manager.start(fresh_name))
    fork = f"{fresh_name}-fork"
    try:
        run(manager.fork(fresh_name, fork))
        page = guest(manager, fork, "/.torpor/bin/wget", "-qO-", "http://127.0.0.1:8080/")
        assert page == (0, "hello from the image\n")
        assert guest(manager, fork, "/.torpor/bin/hostname") == (0, f"{fork}\n")
        assert guest(manager, fork, "cat", "/etc/hostname") == (0, f"{fork}\n")
        # its next fresh boot keeps the name (the kernel command line gives it), though
        # the run config on its disk is its source's
        run(manager.stop(fork))
        run(manager.start(fork))
        assert guest(manager, fork, "/.torpor/bin/hostname") == (0, f"{fork}\n")
        assert guest(manager, fork, "cat", "/etc/hostname") == (0, f"{fork}\n")
    finally:
        run(manager.delete(fork, force=True))
        run(manager.delete(fresh_name, force=True))


def test_command_exit_powers_off_with_its_code(manager: InstanceManager, web_image: str,
                                               fresh_name: str) -> None:
    run(manager.create(fresh_name, oci=OciSource(
        reference=web_image, cmd=["sh", "-c", "echo bye from $GREETING; exit 3"])))
    try:
        info = run(manager.start(fresh_name))
        assert (info.state, info.exit_code) == (InstanceState.STOPPED, 3)
        assert run(manager.logs(fresh_name)) == b"bye from hello from the image\n"
        cli = torpor_cli(manager.data_root.root, "show", fresh_name)
        assert "exit code" in cli.stdout and " 3" in cli.stdout
        # started again: it runs again (the earlier run's code does not linger meanwhile)
        again = run(manager.start(fresh_name))
        assert again.exit_code == 3
        assert run(manager.logs(fresh_name)).count(b"bye") == 2
    finally:
        run(manager.delete(fresh_name, force=True))


def test_debian_image_serves_as_its_user_in_memory_file_mode(
        manager: InstanceManager, registry: str, fresh_name: str) -> None:
    ref = f"{registry}/test/debian:python"
    push(debian_image(), "python", ref)
    port = free_port()
    run(manager.create(fresh_name, oci=OciSource(reference=ref), memory_backing="file",
                       port_forwards=[PortForward(host_port=port, guest_port=8000)]))
    try:
        run(manager.start(fresh_name))
        assert http_get(port) == "hello from debian\n"
        assert "uid=65534" in wait_for_log(manager, fresh_name, "uid=")  # User: nobody
        code, out = guest(manager, fresh_name, "sh", "-c",
                          "cat /etc/debian_version; echo $PYTHONUNBUFFERED; pwd")
        assert code == 0 and out.split("\n")[1:3] == ["1", "/"], out
        run(manager.standby(fresh_name))
        run(manager.restore(fresh_name))
        assert http_get(port) == "hello from debian\n"
    finally:
        run(manager.delete(fresh_name, force=True))


def test_stop_forwards_sigterm_to_the_command(manager: InstanceManager, web_image: str,
                                              fresh_name: str) -> None:
    script = ("trap 'echo got TERM; exit 0' TERM; echo waiting; "
              "while :; do sleep 0.1; done")
    run(manager.create(fresh_name, oci=OciSource(reference=web_image,
                                                 cmd=["sh", "-c", script])))
    try:
        run(manager.start(fresh_name))
        wait_for_log(manager, fresh_name, "waiting")
        run(manager.stop(fresh_name, timeout=30))
        info = run(manager.get(fresh_name))
        assert (info.state, info.exit_code) == (InstanceState.STOPPED, 0)
        assert run(manager.logs(fresh_name)) == b"waiting\ngot TERM\n"
        last = info.last_operation
        assert last is not None and last.kind == "stop"
    finally:
        run(manager.delete(fresh_name, force=True))


def test_an_image_with_no_shell_or_libc_boots_serves_and_runs_exec(
        manager: InstanceManager, registry: str, tmp_path: Path, fresh_name: str) -> None:
    distroless_image(tmp_path / "layout")
    ref = f"{registry}/test/distroless:1"
    push(tmp_path / "layout", "distroless", ref)
    port = free_port()
    run(manager.create(fresh_name, oci=OciSource(reference=ref),
                       port_forwards=[PortForward(host_port=port, guest_port=8080)]))
    try:
        run(manager.start(fresh_name))
        assert http_get(port) == "hello from distroless\n"
        assert guest(manager, fresh_name, "/busybox", "cat", "/index.html") == (
            0, "hello from distroless\n")
        # orphans of the image's processes are reaped by torpor's init (PID 1)
        code, out = guest(manager, fresh_name, "/busybox", "sh", "-c",
                          "(/busybox sleep 0.2 &) ; /busybox sleep 1; /busybox ps -o stat,comm")
        assert code == 0 and not [line for line in out.splitlines()
                                  if line.startswith("Z")], out
        run(manager.standby(fresh_name))
        run(manager.restore(fresh_name))
        assert http_get(port) == "hello from distroless\n"
    finally:
        run(manager.delete(fresh_name, force=True))
