"""Snapshot formats: the manifest and the save/load legs of a machine-state stream.

Knows how to write and read one snapshot given a QEMU monitor; nothing of instances,
locks or metadata.
"""
