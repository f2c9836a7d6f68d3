"""The libvirt baseline: the same guest as a libvirt domain, saved and restored with
`virsh save` / `virsh restore`. Installs libvirt from Debian and starts its daemons
(virtlogd before libvirtd) for the bench when they are not running, and stops those."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from xml.sax.saxutils import escape

from torpor.copy import copy_file
from torpor.hypervisor.vmconfig import VMConfig

URI = "qemu:///system"


def _virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True,
                            check=False, timeout=600)
    if check and result.returncode != 0:
        raise RuntimeError(f"virsh {args[0]} failed: {result.stderr.strip()}")
    return result


@contextlib.contextmanager
def libvirt_running() -> Iterator[None]:
    """libvirt for the block: installed from Debian if missing; its daemons (virtlogd
    before libvirtd) started as our children if none answers, and stopped again after,
    so a bench leaves the host as it found it."""
    if shutil.which("virsh") is None or not Path("/usr/sbin/libvirtd").exists():
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", "libvirt-daemon-system",
                        "libvirt-clients"], check=True, env=env)
    if _virsh("version", check=False).returncode == 0:
        yield  # someone else's daemons: left alone
        return
    with contextlib.ExitStack() as daemons:
        for command in (["virtlogd"], ["libvirtd"]):  # foreground: ours to stop and reap
            daemons.enter_context(_daemon(command))
        deadline = time.monotonic() + 30
        while _virsh("version", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd did not come up")
            time.sleep(0.2)
        yield


@contextlib.contextmanager
def _daemon(command: list[str]) -> Iterator[None]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def domain_xml(name: str, config: VMConfig, disk: Path, agent_socket: Path,
               serial_log: Path) -> str:
    accel_type = "kvm" if config.accel == "kvm" else "qemu"
    initrd = f"<initrd>{config.initrd}</initrd>" if config.initrd else ""
    return f"""<domain type='{accel_type}'>
  <name>{name}</name>
  <memory unit='MiB'>{config.memory_mib}</memory>
  <vcpu>{config.cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{config.kernel}</kernel>{initrd}
    <cmdline>{escape(config.cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='allow'>{config.cpu_model}</model>
  </cpu>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='writeback' discard='unmap'/>
      <source file='{disk}'/><target dev='vda' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <source mode='bind' path='{agent_socket}'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <interface type='user'><model type='virtio'/></interface>
    <serial type='file'><source path='{serial_log}'/><target port='0'/></serial>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class LibvirtGuest:
    """One libvirt domain of the same guest, with its own copy of the disk."""

    def __init__(self, name: str, config: VMConfig, source_disk: Path, workdir: Path) -> None:
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True)
        os.chmod(workdir, 0o755)
        os.chmod(self.dir, 0o777)  # libvirt's QEMU runs as libvirt-qemu
        self.disk = self.dir / "disk.raw"
        copy_file(source_disk, self.disk)
        self.agent_socket = self.dir / "agent.sock"
        self.state_file = self.dir / "state.save"
        xml = self.dir / "domain.xml"
        xml.write_text(domain_xml(name, config, self.disk, self.agent_socket,
                                  self.dir / "serial.log"))
        _virsh("define", str(xml))

    # libvirt itself connects to a channel named org.qemu.guest_agent.0, and QEMU serves
    # one client per chardev, so the agent is reached the libvirt way: qemu-agent-command.

    def _agent(self, command: dict[str, object], timeout: int = 5) -> dict[str, object]:
        out = _virsh("qemu-agent-command", self.name, json.dumps(command),
                     "--timeout", str(timeout)).stdout
        result: dict[str, object] = json.loads(out)
        return result

    async def wait_agent(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await asyncio.to_thread(self._agent, {"execute": "guest-ping"}, 1)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)

    async def start(self) -> None:
        _virsh("start", self.name)
        await self.wait_agent()

    async def exec(self, script: str, timeout: float = 900) -> None:
        started = self._agent({"execute": "guest-exec", "arguments": {
            "path": "/bin/sh", "arg": ["-c", script], "capture-output": True}})
        pid = started["return"]["pid"]  # type: ignore[index]
        deadline = time.monotonic() + timeout
        while not self._agent({"execute": "guest-exec-status",
                               "arguments": {"pid": pid}})["return"]["exited"]:  # type: ignore[index]
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest command did not finish in {timeout} s")
            await asyncio.sleep(0.2)

    async def save_restore(self, prepare: Callable[[int], None]) -> dict[str, float]:
        """prepare(state bytes) runs between save and restore, outside both timings."""
        start = time.monotonic()
        await asyncio.to_thread(_virsh, "save", self.name, str(self.state_file))
        saved = time.monotonic() - start
        size = self.state_file.stat().st_size
        await asyncio.to_thread(prepare, size)
        start = time.monotonic()
        await asyncio.to_thread(_virsh, "restore", str(self.state_file))
        running = time.monotonic() - start  # `virsh restore` returns with the domain running
        await self.wait_agent()
        restored = time.monotonic() - start
        self.state_file.unlink()
        # virsh save pauses the guest first and ends with QEMU gone: all of it is paused.
        return {"paused": saved, "standby": saved, "running": running, "restore": restored,
                "first_cmd": 0.0, "readback": 0.0, "resident": 0, "size": size}

    def destroy(self) -> None:
        _virsh("destroy", self.name, check=False)
        _virsh("undefine", self.name, "--nvram", check=False)
        _virsh("undefine", self.name, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
