"""From an instance's metadata to the VMConfig the hypervisor layer runs."""

from __future__ import annotations

from torpor.hypervisor.vmconfig import Accel, Disk, VMConfig
from torpor.instances.metadata import InstanceMetadata
from torpor.paths import InstancePaths


def vm_config_for(meta: InstanceMetadata, paths: InstancePaths, accel: Accel) -> VMConfig:
    return VMConfig(
        name=meta.name,
        cpus=meta.cpus,
        memory_mib=meta.memory_mib,
        kernel=meta.image.kernel,
        initrd=meta.image.initrd,
        cmdline=meta.image.cmdline,
        disks=(Disk(path=paths.disk, format="raw"),),
        mac=meta.mac,
        port_forwards=tuple(meta.port_forwards),
        accel=accel,
        qmp_socket=paths.qmp_socket,
        qmp_query_socket=paths.qmp_query_socket,
        agent_socket=paths.agent_socket,
        serial_log=paths.serial_log,
        vmgenid=meta.vmgenid,
    )
