"""torpor: standby, restore and fork QEMU virtual machines."""

__version__ = "0.1.0"
