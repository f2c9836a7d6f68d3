"""Instances: orchestration of VMs on a data root (the only layer that combines the
hypervisor, guest agent, copy engine and snapshot formats)."""

from torpor.instances.manager import InstanceInfo, InstanceManager
from torpor.instances.metadata import InstanceMetadata, InstanceState

__all__ = ["InstanceInfo", "InstanceManager", "InstanceMetadata", "InstanceState"]
