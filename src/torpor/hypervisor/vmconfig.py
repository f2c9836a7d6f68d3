"""A typed VM configuration and its rendering to an explicit QEMU argument list.

The rendered argv is deterministic: the same config always yields the same list, which is
what lets a saved machine state name the exact configuration QEMU must be started with
to accept it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Accel = Literal["kvm", "tcg"]

# Works under TCG and KVM alike and pins the guest-visible CPU, so saved state stays
# loadable on any x86-64 host (`-cpu host` aborts on nested hosts, `max` differs by host).
DEFAULT_CPU_MODEL = "qemu64"
MACHINE_TYPE = "q35"


class Disk(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: Path
    format: Literal["raw", "qcow2"] = "raw"
    read_only: bool = False


class PortForward(BaseModel):
    model_config = ConfigDict(frozen=True)

    host_port: int = Field(ge=1, le=65535)
    guest_port: int = Field(ge=1, le=65535)
    protocol: Literal["tcp", "udp"] = "tcp"
    host_addr: str = "127.0.0.1"


class MemoryFile(BaseModel):
    """Guest RAM backed by a file (memory-file mode) instead of anonymous memory."""

    model_config = ConfigDict(frozen=True)

    path: Path
    shared: bool = True  # share=off maps it privately (copy-on-write)


class VMConfig(BaseModel):
    """Everything QEMU needs to run the VM; the manifest of a saved state stores it."""

    model_config = ConfigDict(frozen=True)

    name: str
    cpus: int = Field(ge=1, le=64)
    memory_mib: int = Field(ge=64)
    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""
    disks: tuple[Disk, ...] = ()
    mac: str
    # user: QEMU's user-mode network; tap: this TAP (it exists; torpor's network layer
    # made it); none: no network device at all.
    network: Literal["user", "tap", "none"] = "user"
    tap: str | None = None
    port_forwards: tuple[PortForward, ...] = ()
    accel: Accel = "tcg"
    cpu_model: str = DEFAULT_CPU_MODEL
    machine: str = MACHINE_TYPE
    vmgenid: str | None = None
    # virtio-balloon with free page reporting: the guest hands pages it freed back to
    # QEMU, which discards them (the host gets the memory back while the VM runs).
    free_page_reporting: bool = False
    memory_file: MemoryFile | None = None
    # Runtime endpoints: not guest-visible, so a state may be loaded with other paths.
    qmp_socket: Path
    qmp_query_socket: Path | None = None
    agent_socket: Path
    # The guest agent's port as a `pipe` chardev (FIFOs <path>.in and <path>.out): the
    # guest sees the host always connected, so qemu-ga never sleeps in its 100 ms
    # reconnect poll. None: the socket (QEMUs started before).
    agent_pipe: Path | None = None
    # The guest identity helper's port (a `pipe` chardev: FIFOs <path>.in and <path>.out,
    # made by `launch`); None: no such port (guests made before it).
    identity_pipe: Path | None = None
    serial_log: Path
    # An OCI image instance's main process output, and where its init writes the exit code.
    app_log: Path | None = None
    exit_status: Path | None = None

    @staticmethod
    def saved_guest_visible(saved: dict[str, object]) -> dict[str, object]:
        """A saved state's guest-visible part as `guest_visible` puts it now: a state
        saved before a key existed was saved without what the key adds."""
        return {**GUEST_VISIBLE_ADDED, **saved}

    def guest_visible(self) -> dict[str, object]:
        """The part of the config a saved machine state depends on."""
        return {
            "machine": self.machine,
            "accel": self.accel,
            "cpu_model": self.cpu_model,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "disks": len(self.disks),
            "memory_backing": "file" if self.memory_file else "anonymous",
            "vmgenid": self.vmgenid is not None,
            "free_page_reporting": self.free_page_reporting,
            "app_ports": self.app_log is not None,
            "nic": self.network != "none",
            "identity_port": self.identity_pipe is not None,
        }


# Keys guest_visible gained after states were saved, with the value those states have.
GUEST_VISIBLE_ADDED: dict[str, object] = {"free_page_reporting": False,
                                           "identity_port": False}


def _accel_args(accel: Accel) -> list[str]:
    if accel == "tcg":
        return ["-accel", "tcg,thread=multi"]
    return ["-accel", "kvm"]


def _net_args(config: VMConfig) -> list[str]:
    if config.network == "none":
        return []
    if config.network == "tap":
        netdev = f"tap,id=net0,ifname={config.tap},script=no,downscript=no"
    else:
        forwards = "".join(
            f",hostfwd={f.protocol}:{f.host_addr}:{f.host_port}-:{f.guest_port}"
            for f in config.port_forwards
        )
        netdev = f"user,id=net0{forwards}"
    return [
        "-netdev", netdev,
        "-device", f"virtio-net-pci,netdev=net0,mac={config.mac},romfile=",
    ]


def _app_port_args(config: VMConfig) -> list[str]:
    """Two more ports for an image instance: its main process's output (appended across
    restores, like the console) and its exit status."""
    if config.app_log is None or config.exit_status is None:
        return []
    return [
        "-chardev", f"file,id=applog,path={config.app_log},append=on",
        "-device", "virtserialport,bus=vser0.0,chardev=applog,name=org.torpor.log",
        "-chardev", f"file,id=appstatus,path={config.exit_status}",
        "-device", "virtserialport,bus=vser0.0,chardev=appstatus,name=org.torpor.status",
    ]


def _identity_port_args(config: VMConfig) -> list[str]:
    """The identity helper's port. A `pipe` chardev, not a socket: QEMU holds its FIFOs
    read-write, so the guest sees the host always connected and its read blocks (with a
    socket nobody is connected to, the guest's read returns end of file at once)."""
    if config.identity_pipe is None:
        return []
    return [
        "-chardev", f"pipe,id=identity,path={config.identity_pipe}",
        "-device", "virtserialport,bus=vser0.0,chardev=identity,name=org.torpor.identity",
    ]


def pipe_fifos(pipe: Path) -> tuple[Path, Path]:
    """The FIFOs of QEMU's `pipe` chardev at `pipe` (host → guest, guest → host)."""
    return pipe.with_name(pipe.name + ".in"), pipe.with_name(pipe.name + ".out")


def chardev_fifos(config: VMConfig) -> tuple[Path, ...]:
    """Every FIFO QEMU opens for its `pipe` chardevs (launch makes them first)."""
    pipes = (config.agent_pipe, config.identity_pipe)
    return tuple(fifo for pipe in pipes if pipe is not None for fifo in pipe_fifos(pipe))


def _agent_chardev(config: VMConfig) -> str:
    if config.agent_pipe is not None:
        return f"pipe,id=agent,path={config.agent_pipe}"
    return f"socket,id=agent,path={config.agent_socket},server=on,wait=off"


def _memory_args(config: VMConfig) -> list[str]:
    size = f"{config.memory_mib}M"
    if config.memory_file is None:
        return ["-m", size]
    share = "on" if config.memory_file.shared else "off"
    return [
        "-m", size,
        "-object", f"memory-backend-file,id=ram0,size={size},mem-path={config.memory_file.path},"
                   f"share={share},prealloc=off",
        "-machine", "memory-backend=ram0",
    ]


def zeroed_ram_block(config: VMConfig) -> str | None:
    """The RAM block a QEMU freshly started with this config holds zero-filled (apart
    from what QEMU loads into it itself): anonymous memory on a PC machine."""
    pc_machine = config.machine in ("q35", "pc") or config.machine.startswith("pc-")
    return "pc.ram" if pc_machine and config.memory_file is None else None


def drive_id(index: int) -> str:
    """The name QEMU (QMP's `device`) knows the config's disk number `index` by."""
    return f"disk{index}"


DEFERRED = "defer"  # -incoming: the stream's source is given later (QMP migrate-incoming)
# After an incoming migration QEMU has the guest announce itself on the network (gratuitous
# ARP, IPv6 neighbour advertisements; 5 rounds): that is for a VM that moved to another
# host. A restored or forked VM is where it was saved, and its network stack, run cold
# under TCG right as it resumes, cost ~20 ms of the restore's wait for the agent here.
NO_SELF_ANNOUNCE = ("-global", "migration.announce-rounds=0")


def render_argv(config: VMConfig, *, binary: str = "qemu-system-x86_64",
                incoming: str | None = None) -> list[str]:
    """The full argument list; `incoming` (DEFERRED, or a URI such as `fd:N`) starts QEMU
    loading a migration stream instead of booting."""
    argv = [
        binary,
        "-name", f"{config.name},debug-threads=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", config.machine,
        *_accel_args(config.accel),
        "-cpu", config.cpu_model,
        "-smp", str(config.cpus),
        *_memory_args(config),
        "-kernel", str(config.kernel),
    ]
    if config.initrd:
        argv += ["-initrd", str(config.initrd)]
    if config.cmdline:
        argv += ["-append", config.cmdline]
    # append: a restored VM keeps the console history of its earlier runs
    argv += ["-chardev", f"file,id=serial0,path={config.serial_log},append=on",
             "-serial", "chardev:serial0"]
    argv += ["-qmp", f"unix:{config.qmp_socket},server=on,wait=off"]
    if config.qmp_query_socket:
        argv += ["-qmp", f"unix:{config.qmp_query_socket},server=on,wait=off"]
    for index, disk in enumerate(config.disks):
        ro = ",read-only=on" if disk.read_only else ""
        argv += [
            "-drive", f"file={disk.path},if=none,id={drive_id(index)},format={disk.format},"
                      f"cache=writeback,discard=unmap{ro}",
            "-device", f"virtio-blk-pci,drive={drive_id(index)}",
        ]
    argv += [
        "-chardev", _agent_chardev(config),
        "-device", "virtio-serial-pci,id=vser0",
        "-device", "virtserialport,bus=vser0.0,chardev=agent,name=org.qemu.guest_agent.0",
        *_app_port_args(config),
        *_identity_port_args(config),
        *_net_args(config),
        "-device", "virtio-rng-pci",
    ]
    if config.vmgenid:
        argv += ["-device", f"vmgenid,guid={config.vmgenid}"]
    if config.free_page_reporting:
        argv += ["-device", "virtio-balloon-pci,free-page-reporting=on"]
    if incoming is not None:
        # -S: stay paused after the state is loaded, until the caller has verified it.
        argv += ["-S", "-incoming", incoming, *NO_SELF_ANNOUNCE]
    return argv
