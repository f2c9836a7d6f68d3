"""Leave out of a QEMU 7.2 migration stream the zero pages a receiving QEMU already has.

QEMU sends every guest page; a page of zeros goes as a 9-byte record. Loading one is not
free: the destination reads the whole page to see whether it must write it, and keeps
books on the record: half of an idle 2 GiB guest's load, measured. A QEMU started with
`-incoming` holds its main RAM zero-filled: it does not even copy ROM blobs (a PVH
kernel's ELF segments) into RAM, since the stream will bring them (rom_reset in
hw/core/loader.c skips them while in INMIGRATE; checked here with pmemsave). A zero-page
record of that block, for a page no earlier record wrote, changes nothing there, so the
filter drops it; everything else passes through byte for byte.

Only as much of the format as that needs is parsed (migration/savevm.c, migration/ram.c):
the file header, the configuration section, and the records of the `ram` sections
(`be64(offset | flags)`, a block name unless CONTINUE, a payload). Whatever else comes
(device sections, an unknown record) is passed through untouched from there on. Dropping
only records that carry CONTINUE keeps the block each later record refers to unchanged,
so the stream stays valid at every point where the filter may stop filtering.
"""

from __future__ import annotations

import functools
import os
import re
import select
import struct
import sys
import threading
from array import array
from collections.abc import Callable, Iterable
from enum import Enum, auto

# The QEMU versions whose stream format and incoming RAM this filter's tests cover; on any
# other the stream is saved whole (a format change, or an incoming QEMU that no longer
# starts with its RAM zero-filled, would make a filtered state wrong without an error).
PROVEN_ON = ("7.2.",)

PAGE_SIZE = 4096
FILE_MAGIC = b"QEVM"
FILE_VERSION = 3

SECTION_START, SECTION_PART, SECTION_END = 0x01, 0x02, 0x03
CONFIGURATION = 0x07
SUBSECTION = 0x05
SECTION_FOOTER = 0x7E

FLAG_ZERO, FLAG_MEM_SIZE, FLAG_PAGE, FLAG_EOS, FLAG_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
FLAGS_MASK = PAGE_SIZE - 1
ZERO_CONTINUED = FLAG_ZERO | FLAG_CONTINUE
PAGE_CONTINUED = FLAG_PAGE | FLAG_CONTINUE
ZERO_RECORD_SIZE = 9  # be64 header + the fill byte

# A run of zero-filled-page records within the current block: flags (the low 12 bits of
# the header) exactly ZERO|CONTINUE, fill byte 0. Matched at a record boundary only.
_ZERO_RUN = re.compile(
    rb"(?:.{6}[\x00\x10\x20\x30\x40\x50\x60\x70\x80\x90\xa0\xb0\xc0\xd0\xe0\xf0]\x22\x00)+",
    re.DOTALL)
_BE64 = struct.Struct(">Q")
_BE32 = struct.Struct(">I")

Buffer = bytes | bytearray | memoryview
_CARRY = 8192  # room for the record a read cut: a page with its block name fits
_STOP_CHECK_MS = 100


def proven_on(qemu_version: str) -> bool:
    """Whether the filter may run on a QEMU of this version ("7.2.0")."""
    return qemu_version.startswith(PROVEN_ON)


class StreamAbandoned(Exception):
    """The pump was told to stop before the stream ended."""


class _Need(Exception):
    """The record at hand continues in the next chunk."""


class _Stage(Enum):
    HEADER = auto()
    SECTION = auto()
    RECORDS = auto()
    FOOTER = auto()
    PASS_THROUGH = auto()


class ZeroPageFilter:
    """Feed the stream in chunks; each call returns the parts to write, in order."""

    def __init__(self, fresh_block: str) -> None:
        """fresh_block: the RAM block (e.g. "pc.ram") a receiving QEMU holds zeroed."""
        self._block_name = fresh_block.encode()
        # One byte per page of the fresh block: 1 once a kept record wrote it (sized by
        # the setup record; until then nothing is dropped).
        self._written: bytearray | None = None
        self._stage = _Stage.HEADER
        self._ram_section: int | None = None
        self._block: bytes | None = None
        self.dropped_pages = 0

    @property
    def filtering(self) -> bool:
        """False once the filter passes everything through (device sections onwards)."""
        return self._stage is not _Stage.PASS_THROUGH

    def scan(self, buf: Buffer) -> tuple[list[memoryview], int]:
        """Parse from the start of buf: the spans of it to write, in order, and how far
        it got. The rest (a record cut by the end of buf) must be passed again, followed
        by more of the stream."""
        view = memoryview(buf)
        if not self.filtering:
            return [view], len(buf)
        kept: list[memoryview] = []
        keep_from = pos = 0
        size = len(buf)
        fresh = self._block_name
        written = self._written
        try:
            while pos < size:
                if not self.filtering:
                    pos = size
                    break
                if self._stage is not _Stage.RECORDS:
                    pos = self._step(buf, pos)
                    continue
                if pos + 8 <= size:  # the common records, without a call
                    flags = buf[pos + 7] | (buf[pos + 6] & 0x0F) << 8
                    if flags == PAGE_CONTINUED:
                        if pos + 8 + PAGE_SIZE > size:
                            break
                        if self._block == fresh and written is not None:
                            self._mark_written(_BE64.unpack_from(buf, pos)[0])
                        pos += 8 + PAGE_SIZE
                        continue
                    if flags == ZERO_CONTINUED and self._block == fresh and written:
                        run = _ZERO_RUN.match(buf, pos)
                        if run is not None:
                            for start, end in self._droppable(buf, pos, run.end()):
                                if start > keep_from:
                                    kept.append(view[keep_from:start])
                                keep_from = end
                            pos = run.end()
                            continue
                pos = self._step(buf, pos)
                written = self._written
        except _Need:
            pass
        if pos > keep_from:
            kept.append(view[keep_from:pos])
        return kept, pos

    # -- parsing ------------------------------------------------------------------------

    def _droppable(self, buf: Buffer, start: int, end: int) -> Iterable[tuple[int, int]]:
        """The spans of a zero-record run that may go: all of it unless it reaches a
        page an earlier record wrote, then record by record."""
        count = (end - start) // ZERO_RECORD_SIZE
        low, high = _offset_bounds(bytes(buf[start:end]), count)
        if not self._any_written(low, high):
            self.dropped_pages += count
            return [(start, end)]
        spans = []
        for at in range(start, end, ZERO_RECORD_SIZE):
            offset = _BE64.unpack_from(buf, at)[0] & ~FLAGS_MASK
            if self._any_written(offset, offset):
                self._mark_written(offset)  # kept: it writes the page
            else:
                spans.append((at, at + ZERO_RECORD_SIZE))
                self.dropped_pages += 1
        return spans

    def _any_written(self, low: int, high: int) -> bool:
        assert self._written is not None
        return self._written.find(1, low >> 12, (high >> 12) + 1) != -1

    def _mark_written(self, header: int) -> None:
        """A kept record of the fresh block writes its page (header: offset | flags)."""
        assert self._written is not None
        page = header >> 12
        if page >= len(self._written):  # not a page of the block: stop filtering
            self._stage = _Stage.PASS_THROUGH
            self._written = None
        else:
            self._written[page] = 1

    def _step(self, buf: Buffer, pos: int) -> int:
        """Parse one unit at pos (header, section header, record, footer); its end."""
        if self._stage is _Stage.HEADER:
            head = _take(buf, pos, 8)
            if head[:4] != FILE_MAGIC or _BE32.unpack(head[4:])[0] != FILE_VERSION:
                self._stage = _Stage.PASS_THROUGH
                return pos
            self._stage = _Stage.SECTION
            return pos + 8
        if self._stage is _Stage.SECTION:
            return self._section_header(buf, pos)
        if self._stage is _Stage.FOOTER:  # optional: sent by machine types since 2.4
            end = pos + 5 if _take(buf, pos, 1)[0] == SECTION_FOOTER else pos
            _need(buf, end)
            self._stage = _Stage.SECTION
            return end
        return self._record(buf, pos)

    def _section_header(self, buf: Buffer, pos: int) -> int:
        kind = _take(buf, pos, 1)[0]
        if kind == CONFIGURATION:
            name_len = int(_BE32.unpack(_take(buf, pos + 1, 4))[0])
            end = pos + 5 + name_len
            # A subsection after it (capabilities, uuid) is not parsed: stop here.
            if _take(buf, end, 1)[0] == SUBSECTION:
                self._stage = _Stage.PASS_THROUGH
            return end
        if kind == SECTION_START:
            section = _BE32.unpack(_take(buf, pos + 1, 4))[0]
            id_len = _take(buf, pos + 5, 1)[0]
            idstr = _take(buf, pos + 6, id_len)
            _need(buf, pos + 6 + id_len + 8)  # instance id, version id
            if idstr != b"ram" or self._ram_section not in (None, section):
                self._stage = _Stage.PASS_THROUGH
                return pos
            self._ram_section = section
            self._stage = _Stage.RECORDS
            return pos + 6 + id_len + 8
        if kind in (SECTION_PART, SECTION_END):
            section = _BE32.unpack(_take(buf, pos + 1, 4))[0]
            if section != self._ram_section:
                self._stage = _Stage.PASS_THROUGH
                return pos
            self._stage = _Stage.RECORDS
            return pos + 5
        self._stage = _Stage.PASS_THROUGH  # device state and the rest
        return pos

    def _record(self, buf: Buffer, pos: int) -> int:
        header = _BE64.unpack(_take(buf, pos, 8))[0]
        flags = header & FLAGS_MASK
        kind = flags & ~FLAG_CONTINUE
        at = pos + 8
        block: bytes | None
        if kind in (FLAG_ZERO, FLAG_PAGE):
            if not flags & FLAG_CONTINUE:
                name_len = _take(buf, at, 1)[0]
                block = _take(buf, at + 1, name_len)
                at += 1 + name_len
            else:
                block = self._block
            payload = 1 if kind == FLAG_ZERO else PAGE_SIZE
            _need(buf, at + payload)
            self._block = block
            if block == self._block_name and self._written is not None:
                self._mark_written(header)
            return at + payload
        if kind == FLAG_MEM_SIZE:
            return self._block_list(buf, at, total=header & ~FLAGS_MASK)
        if kind == FLAG_EOS:
            self._stage = _Stage.FOOTER
            return at
        self._stage = _Stage.PASS_THROUGH  # a record kind this filter does not know
        return pos

    def _block_list(self, buf: Buffer, at: int, total: int) -> int:
        """The setup record's list of RAM blocks: (name, used length) until `total`."""
        seen, blocks = 0, {}
        while seen < total:
            name_len = _take(buf, at, 1)[0]
            name = _take(buf, at + 1, name_len)
            blocks[name] = int(_BE64.unpack(_take(buf, at + 1 + name_len, 8))[0])
            seen += blocks[name]
            at += 1 + name_len + 8
        if self._written is None and self._block_name in blocks:
            self._written = bytearray(blocks[self._block_name] // PAGE_SIZE + 1)
        return at


def _take(buf: Buffer, pos: int, size: int) -> bytes:
    """size bytes at pos, or _Need if buf ends before."""
    if pos + size > len(buf):
        raise _Need
    return bytes(buf[pos:pos + size])


def _need(buf: Buffer, end: int) -> None:
    if end > len(buf):
        raise _Need


def _offset_bounds(run: bytes, count: int) -> tuple[int, int]:
    """Lowest and highest page offset in a run of 9-byte zero records, at C speed: the
    eight header bytes of every record are gathered with strided slices."""
    headers = bytearray(8 * count)
    for byte in range(8):
        headers[byte::8] = run[byte::ZERO_RECORD_SIZE]
    values = array("Q")
    values.frombytes(headers)
    if sys.byteorder == "little":
        values.byteswap()
    return min(values) & ~FLAGS_MASK, max(values) & ~FLAGS_MASK


def pump(source: int, sink: int | Callable[[memoryview], object], fresh_block: str,
         stop: threading.Event, chunk: int = 1 << 20,
         written: Callable[[memoryview], object] | None = None) -> int:
    """Copy a migration stream from fd `source` to `sink` (an fd, or a function taking
    what to write) until EOF, without the zero pages of `fresh_block` a receiving QEMU
    already has; returns how many it left out.
    Blocking: run it in a thread; `stop` makes it give up waiting for input (a writer that neither
    writes nor closes). An error writing (a full disk) raises. `written` sees every byte
    written, in order (e.g. a hash of the stored file, with no second pass over it)."""

    write = sink if callable(sink) else functools.partial(write_all, sink)

    def emit(part: memoryview) -> None:
        if written is not None:
            written(part)
        write(part)

    stream = ZeroPageFilter(fresh_block)
    buf = bytearray(chunk + _CARRY)
    view = memoryview(buf)
    carried = 0
    readable = select.poll()
    readable.register(source, select.POLLIN)
    while True:
        while not readable.poll(_STOP_CHECK_MS):
            if stop.is_set():
                raise StreamAbandoned("the migration stream was abandoned before its end")
        got = os.readv(source, [view[carried:carried + chunk]])
        if got == 0:
            emit(view[:carried])  # a stream cut short: passed on as it is
            return stream.dropped_pages
        parts, used = stream.scan(view[:carried + got])
        for part in parts:
            emit(part)
        carried = carried + got - used
        if len(buf) - carried < chunk:  # a unit longer than _CARRY: a bigger buffer
            bigger = bytearray(carried + chunk + _CARRY)
            bigger[:carried] = view[used:used + carried]
            buf, view = bigger, memoryview(bigger)
        else:
            view[:carried] = view[used:used + carried]


def write_all(fd: int, data: memoryview) -> None:
    """All of `data` to a blocking fd."""
    while data:
        data = data[os.write(fd, data):]

