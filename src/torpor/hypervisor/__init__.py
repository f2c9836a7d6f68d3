"""The hypervisor layer: QEMU processes, their argument lists and QMP.

Knows nothing of instances, snapshots or the data root: callers hand it a VMConfig
and paths.
"""

from torpor.hypervisor.process import TrackedProcess, launch
from torpor.hypervisor.qmp import Monitor
from torpor.hypervisor.vmconfig import Disk, PortForward, VMConfig, render_argv

__all__ = ["Disk", "Monitor", "PortForward", "TrackedProcess", "VMConfig", "launch", "render_argv"]
