"""The hypervisor layer: QEMU processes (process.py), their argument lists (vmconfig.py),
QMP (qmp.py), the accelerator probe (accel.py) and disk freezing (blockfreeze.py).

Knows nothing of instances, snapshots or the data root: callers hand it a VMConfig
and paths. Import the modules themselves: this package imports none of them, so that
what only needs a VMConfig's types does not load asyncio and QMP.
"""
