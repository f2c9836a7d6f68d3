"""Instances: what an instance is (its stored metadata, its derived state and which
operation that state allows, its running QEMU's record, the context an operation is
handed). The operations themselves are in `torpor.operations`; `torpor.manager` is the
entry point."""

from torpor.instances.metadata import InstanceMetadata, InstanceState

__all__ = ["InstanceMetadata", "InstanceState"]
