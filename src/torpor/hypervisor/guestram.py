"""A running QEMU's file-backed guest RAM, from outside it: its pages mapped into QEMU's
page tables ahead of the guest.

After a memory-file restore the RAM file is read into the page cache (fsutil.prefetch),
but the new QEMU has none of it mapped: the guest's first pass over its memory costs QEMU
a page fault per 64 KiB (the kernel maps the cached pages around each fault, 16 of them),
~17 µs each on this nested host. Reading one byte per 64 KiB of QEMU's mapping with
`process_vm_readv` has the kernel take those faults now, for QEMU, on a thread of ours
(docs/design.md, "Read-back after a restore"). Write faults (the first write to a page
of a shared file mapping) cannot be taken ahead by a read: they stay.

`process_vm_readv` through ctypes: Python's `os` has no binding, and no kept library
offers one for this single call.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from pathlib import Path

from torpor.fsutil import data_extents

log = logging.getLogger(__name__)

FAULT_AROUND = 64 << 10  # the kernel's default fault_around_bytes
BATCH = 1024  # iovecs per call (IOV_MAX)


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_process_vm_readv = _libc.process_vm_readv
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                              ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]


def mapping_of(pid: int, path: Path) -> int | None:
    """The address where process `pid` maps `path` from its start (None: it does not)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path) and int(fields[2], 16) == 0:
            return int(fields[0].partition("-")[0], 16)
    return None


def map_in(pid: int, path: Path, stop: threading.Event | None = None) -> int:
    """Have the kernel map the allocated ranges of `path` into process `pid`'s mapping of
    it (read faults taken here, one per FAULT_AROUND). Best effort, never an error: it
    stops when the process or its mapping goes away, or `stop` is set. The bytes
    covered."""
    base = mapping_of(pid, path)
    if base is None:
        return 0
    try:
        with open(path, "rb") as f:
            offsets = [offset for start, end in data_extents(f.fileno())
                       for offset in range(start - start % FAULT_AROUND, end, FAULT_AROUND)]
    except OSError as exc:
        log.warning("mapping %s into process %d: %s", path, pid, exc)
        return 0
    sink = ctypes.create_string_buffer(1)
    local = (_IoVec * BATCH)(*[_IoVec(ctypes.addressof(sink), 1)] * BATCH)
    done = 0
    for first in range(0, len(offsets), BATCH):
        if stop is not None and stop.is_set():
            break
        batch = offsets[first:first + BATCH]
        remote = (_IoVec * len(batch))(*[_IoVec(base + offset, 1) for offset in batch])
        # Each one-byte iovec of ours takes one byte of theirs: the counts line up.
        read = _process_vm_readv(pid, local, len(batch), remote, len(batch), 0)
        if read < 0:
            code = ctypes.get_errno()
            if code not in (errno.ESRCH, errno.EFAULT):  # (QEMU exited, or unmapped it)
                log.warning("mapping %s into process %d: %s", path, pid, os.strerror(code))
            break
        done += read * FAULT_AROUND
        if read < len(batch):
            break
    return done
