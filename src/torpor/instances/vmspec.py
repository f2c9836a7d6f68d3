"""From an instance's metadata to the VMConfig the hypervisor layer runs."""

from __future__ import annotations

from torpor.hypervisor.vmconfig import Accel, Disk, MemoryFile, VMConfig
from torpor.instances.metadata import InstanceMetadata, tap_name
from torpor.paths import InstancePaths


def memory_file_for(meta: InstanceMetadata, paths: InstancePaths) -> MemoryFile | None:
    """Own RAM file mapped shared, a fork's origin file mapped privately, or none."""
    if meta.memory_backing != "file":
        return None
    if meta.memory_origin is not None:
        return MemoryFile(path=meta.memory_origin, shared=False)
    return MemoryFile(path=paths.memory_file, shared=True)


def vm_config_for(meta: InstanceMetadata, paths: InstancePaths, accel: Accel) -> VMConfig:
    oci = meta.image.kind == "oci"
    return VMConfig(
        name=meta.name,
        cpus=meta.cpus,
        memory_mib=meta.memory_mib,
        kernel=meta.image.kernel,
        initrd=meta.image.initrd,
        # the name at every boot: a fork keeps its own across reboots
        cmdline=(meta.image.cmdline + meta.network.kernel_arg()
                 + (f" torpor.hostname={meta.name}" if meta.identity_helper else "")),
        disks=(Disk(path=paths.disk, format="raw"),),
        mac=meta.mac,
        network={"user": "user", "bridge": "tap", "none": "none"}[meta.network.mode],
        tap=tap_name(meta.id) if meta.network.mode == "bridge" else None,
        # published ports: operations/network.py's relay (and, in user mode, the
        # loopback forwards it sets here before each start)
        accel=accel,
        qmp_socket=paths.qmp_socket,
        qmp_query_socket=paths.qmp_query_socket,
        agent_socket=paths.agent_socket,
        agent_pipe=paths.agent_pipe,
        identity_pipe=paths.identity_pipe if meta.identity_helper else None,
        serial_log=paths.serial_log,
        vmgenid=meta.vmgenid,
        free_page_reporting=meta.free_page_reporting,
        memory_file=memory_file_for(meta, paths),
        app_log=paths.app_log if oci else None,
        exit_status=paths.exit_status if oci else None,
    )
