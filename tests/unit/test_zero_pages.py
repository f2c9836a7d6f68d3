"""The zero-page filter: a receiving QEMU (its RAM zero-filled) loading the filtered
stream ends up with the same memory as one loading the original, whatever the chunking;
anything the filter does not know passes through untouched."""

from __future__ import annotations

import itertools
import os
import struct
import threading
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torpor.machinestate.zeropages import PAGE_SIZE, StreamAbandoned, ZeroPageFilter, pump

MAIN, OTHER = "pc.ram", "pc.bios"
DEVICE_STATE = b"\x04\x00\x00\x00\x09\x03cpu\x00\x00\x00\x00\x00\x00\x00\x01" + bytes(
    range(256)) * 3 + b"\x1f"  # opaque to the filter; must arrive intact


def be32(value: int) -> bytes:
    return struct.pack(">I", value)


def be64(value: int) -> bytes:
    return struct.pack(">Q", value)


def record(offset: int, flags: int, block: str | None, payload: bytes) -> bytes:
    name = b"" if block is None else bytes([len(block)]) + block.encode()
    return be64(offset | flags | (0x20 if block is None else 0)) + name + payload


@dataclass
class Stream:
    """A QEMU-7.2-shaped stream; `block` tracks which block CONTINUE refers to."""

    data: bytearray = field(default_factory=bytearray)
    block: str | None = None

    def page(self, block: str, index: int, fill: int | None) -> None:
        """fill None: a page of data; else a zero-page record with that fill byte."""
        named = None if block == self.block else block
        if fill is None:
            self.data += record(index * PAGE_SIZE, 0x08, named, bytes([index % 251 + 1]) *
                                PAGE_SIZE)
        else:
            self.data += record(index * PAGE_SIZE, 0x02, named, bytes([fill]))
        self.block = block


def build(sections: list[list[tuple[str, int, int | None]]], *, footer: bool = True) -> bytes:
    stream = Stream()
    stream.data += b"QEVM" + be32(3) + b"\x07" + be32(3) + b"q35"
    for number, pages in enumerate(sections):
        if number == 0:
            stream.data += b"\x01" + be32(2) + b"\x03ram" + be32(0) + be32(4)
            stream.data += be64((64 + 16) * PAGE_SIZE | 0x04)
            stream.data += b"\x06pc.ram" + be64(64 * PAGE_SIZE)
            stream.data += b"\x07pc.bios" + be64(16 * PAGE_SIZE)
        else:
            stream.data += (b"\x03" if number == len(sections) - 1 else b"\x02") + be32(2)
        for block, index, fill in pages:
            stream.page(block, index, fill)
        stream.data += be64(0x10)
        if footer:
            stream.data += b"\x7e" + be32(2)
    stream.data += DEVICE_STATE
    return bytes(stream.data)


def load(stream: bytes) -> tuple[dict[tuple[bytes, int], bytes], bytes]:
    """What a receiving QEMU holds after loading `stream` (a reference decoder): its
    non-zero pages by (block, offset), and the bytes after the RAM sections."""
    memory: dict[tuple[bytes, int], bytes] = {}
    pos, block = 8, b""
    pos += 5 + struct.unpack(">I", stream[9:13])[0]
    while stream[pos] in (1, 2, 3):
        pos += 1 + 4 + (1 + stream[pos + 5] + 8 if stream[pos] == 1 else 0)
        while True:
            header = struct.unpack(">Q", stream[pos:pos + 8])[0]
            flags, offset = header & 0xFFF, header & ~0xFFF
            pos += 8
            if flags & 0x04:
                seen = 0
                while seen < offset:
                    pos += 1 + stream[pos]
                    seen += struct.unpack(">Q", stream[pos:pos + 8])[0]
                    pos += 8
                continue
            if flags & 0x10:
                break
            if not flags & 0x20:
                block = stream[pos + 1:pos + 1 + stream[pos]]
                pos += 1 + stream[pos]
            if flags & 0x02:
                memory[(block, offset)] = bytes([stream[pos]]) * PAGE_SIZE
                pos += 1
            else:
                memory[(block, offset)] = stream[pos:pos + PAGE_SIZE]
                pos += PAGE_SIZE
        if stream[pos] == 0x7E:
            pos += 5
    zero = bytes(PAGE_SIZE)
    return {k: v for k, v in memory.items() if v != zero}, stream[pos:]


def filtered(stream: bytes, cuts: list[int]) -> tuple[bytes, int]:
    """Feed `stream` cut at `cuts`, carrying unparsed bytes as the pump does."""
    zero_filter, out, carried = ZeroPageFilter(MAIN), bytearray(), b""
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for start, end in itertools.pairwise(bounds):
        buf = carried + stream[start:end]
        parts, used = zero_filter.scan(buf)
        out += b"".join(parts)
        carried = buf[used:]
    return bytes(out + carried), zero_filter.dropped_pages


page_entries = st.tuples(st.sampled_from([MAIN, MAIN, MAIN, OTHER]), st.integers(0, 15),
                         st.sampled_from([None, 0, 0, 0, 0, 7]))


@settings(max_examples=150, deadline=None)
@given(sections=st.lists(st.lists(page_entries, max_size=40), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 200_000), max_size=12), footer=st.booleans())
def test_destination_memory_is_the_same_whatever_the_chunks(
        sections: list[list[tuple[str, int, int | None]]], cuts: list[int],
        footer: bool) -> None:
    original = build(sections, footer=footer)
    out, dropped = filtered(original, [c % (len(original) + 1) for c in cuts])
    assert load(out) == load(original)
    assert len(original) - len(out) == 9 * dropped
    assert out == filtered(original, [])[0]  # where the reads end changes nothing


def test_a_read_may_end_anywhere() -> None:
    """Every place one read can end (a header, a block name, a footer): the same output."""
    original = build([[(MAIN, 0, 0), (MAIN, 1, 0), (OTHER, 0, 0)],
                      [(OTHER, 1, 0), (MAIN, 2, 0), (MAIN, 3, 0)],
                      [(MAIN, 4, None), (MAIN, 5, 0)]])
    whole, dropped = filtered(original, [])
    assert dropped == 3
    for cut in range(len(original)):
        assert filtered(original, [cut]) == (whole, dropped), cut


def test_drops_only_continued_zero_pages_of_the_fresh_block() -> None:
    pages: list[tuple[str, int, int | None]] = [
        (MAIN, 0, 0),                # names its block: kept
        (MAIN, 1, 0), (MAIN, 2, 0),  # dropped
        (MAIN, 7, 3),                # fill byte 3: kept
        (MAIN, 8, None),             # data: kept
        (MAIN, 9, 0),                # dropped
        (OTHER, 1, 0), (OTHER, 2, 0),  # another block: kept
    ]
    original = build([pages])
    out, dropped = filtered(original, [])
    assert dropped == 3
    assert len(original) - len(out) == 27
    assert load(out) == load(original)
    assert out.endswith(DEVICE_STATE)


def test_a_page_written_earlier_keeps_its_zero_record() -> None:
    """A page sent again (dirtied between passes) as zeros must overwrite its data."""
    pages: list[tuple[str, int, int | None]] = [(MAIN, 0, None), (MAIN, 5, None)] + [
        (MAIN, i, 0) for i in range(1, 12)]
    original = build([pages])
    out, dropped = filtered(original, [])
    assert dropped == 11 - 1  # page 5's second record stays
    assert load(out) == load(original)


def test_unknown_record_passes_everything_after_it_through() -> None:
    head = build([[(MAIN, 0, None), (MAIN, 1, 0), (MAIN, 2, 0)]])
    cut = head.index(be64(0x10), 60)  # the EOS of the only section
    # an XBZRLE record (flag 0x40) the filter cannot size: the rest is opaque to it
    tail = be64(3 * PAGE_SIZE | 0x40 | 0x20) + b"\x00" * 40 + be64(4 * PAGE_SIZE | 0x22) + b"\x00"
    original = head[:cut] + tail + head[cut:]
    out, dropped = filtered(original, [cut + 3])
    assert dropped == 2
    assert out == original[:cut - 18] + original[cut:]  # pages 1, 2 gone, the rest intact


@pytest.mark.parametrize("stream", [b"", b"not a migration stream at all" * 100,
                                    b"QEVM" + be32(2) + b"\x00" * 4000])
def test_anything_else_passes_through(stream: bytes) -> None:
    assert filtered(stream, [7, 100]) == (stream, 0)


def test_configuration_subsection_stops_filtering() -> None:
    original = build([[(MAIN, 0, None), (MAIN, 1, 0)]])
    with_subsection = original[:15] + b"\x05" + original[15:]  # after "q35"
    assert filtered(with_subsection, []) == (with_subsection, 0)


def pumped(stream: bytes) -> tuple[bytes, int]:
    """`stream` written in small pieces into a pipe, pumped (1000-byte reads) into
    another: what came out, and the pages left out. What the pump says it wrote must be
    what came out."""
    told = bytearray()
    source_r, source_w = os.pipe()
    sink_r, sink_w = os.pipe()
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(_read_all(sink_r)))
    reader.start()
    writer = threading.Thread(target=lambda: (_write_slowly(source_w, stream),
                                              os.close(source_w)))
    writer.start()
    try:
        dropped = pump(source_r, sink_w, MAIN, threading.Event(), chunk=1000,
                       written=told.extend)
    finally:
        os.close(sink_w)
        writer.join()
        reader.join()
        os.close(source_r)
        os.close(sink_r)
    assert told == received
    return bytes(received), dropped


def test_pump_copies_through_pipes_and_stops_when_told() -> None:
    original = build([[(MAIN, 0, None)] + [(MAIN, i, 0) for i in range(1, 64)], []])
    assert pumped(original) == filtered(original, [])

    idle_r, idle_w = os.pipe()  # a writer that neither writes nor closes
    stop = threading.Event()
    stop.set()
    with pytest.raises(StreamAbandoned):
        pump(idle_r, idle_w, MAIN, stop)
    os.close(idle_r)
    os.close(idle_w)


def test_pump_carries_a_unit_longer_than_its_buffer() -> None:
    """A configuration section longer than a read and its carry room still parses."""
    original = build([[(MAIN, 0, None), (MAIN, 1, 0), (MAIN, 2, 0)]])
    long_name = b"m" * 20_000
    original = original[:9] + be32(len(long_name)) + long_name + original[16:]
    expected, dropped = filtered(original, [])
    assert dropped == 2
    assert pumped(original) == (expected, dropped)


def _write_slowly(fd: int, data: bytes) -> None:
    for start in range(0, len(data), 777):
        os.write(fd, data[start:start + 777])


def _read_all(fd: int) -> bytes:
    out = bytearray()
    while chunk := os.read(fd, 65536):
        out += chunk
    return bytes(out)
