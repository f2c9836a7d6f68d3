"""The guest's identity helper (images/torpor-identity.S), run here on the host: the
bytes build-guest.sh writes are the assembled source, and the program answers requests
on a terminal standing in for its virtio port, in private UTS and network namespaces
(hostname and MAC changes stay there; a clock request it must refuse keeps the host's
clock untouched). Run as a module, it prints the printf line for build-guest.sh."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor.guest import identity

IMAGES = Path(__file__).resolve().parents[2] / "src" / "torpor" / "images"
SOURCE = IMAGES / "torpor-identity.S"
RECIPE = IMAGES / "build-guest.sh"
BASE = 0x400000
HEADERS = 64 + 56  # ELF header and one program header


def assemble() -> bytes:
    """The source as a minimal static ELF: one RWX segment (code, then the zeroed
    buffers), no section headers."""
    with tempfile.TemporaryDirectory() as tmp:
        obj, linked, code = (Path(tmp) / n for n in ("h.o", "h", "code.bin"))
        subprocess.run(["as", "--64", "-o", obj, SOURCE], check=True)
        subprocess.run(["ld", "-N", "-s", "--build-id=none", "--no-warn-rwx-segments",
                        "-e", "_start", f"-Ttext={BASE + HEADERS:#x}", "-o", linked, obj],
                       check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", linked, code], check=True)
        text = code.read_bytes()
        sizes = subprocess.run(["size", "-A", linked], check=True, capture_output=True,
                               text=True).stdout
    bss = int(re.search(r"^\.bss\s+(\d+)\s+(\d+)", sizes, re.M).group(1))  # type: ignore[union-attr]
    bss_at = int(re.search(r"^\.bss\s+\d+\s+(\d+)", sizes, re.M).group(1))  # type: ignore[union-attr]
    file_size = HEADERS + len(text)
    memory_size = bss_at + bss - BASE
    header = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, 2, 0x3E, 1,
                         BASE + HEADERS, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    segment = struct.pack("<IIQQQQQQ", 1, 7, 0, BASE, BASE, file_size, memory_size, 0x1000)
    return header + segment + text


def recipe_bytes() -> bytes:
    line = next(li for li in RECIPE.read_text().splitlines()
                if li.startswith("printf") and "torpor-identity" in li)
    escaped = line.split("'")[1]
    return bytes(int(h, 16) for h in re.findall(r"\\x([0-9a-f]{2})", escaped))


def printf_line(blob: bytes) -> str:
    return "printf '" + "".join(f"\\x{b:02x}" for b in blob) + "' > root/sbin/torpor-identity"


binutils = pytest.mark.skipif(not all(shutil.which(t) for t in ("as", "ld", "objcopy", "size")),
                              reason="binutils are not installed")


@binutils
def test_the_recipe_carries_the_assembled_source() -> None:
    assert recipe_bytes() == assemble()


@pytest.fixture
def helper(tmp_path: Path) -> Path:
    program = tmp_path / "torpor-identity"
    program.write_bytes(recipe_bytes())
    program.chmod(0o755)
    return program


def exchange(helper: Path, requests: list[bytes], replies: int, *, setup: str = "",
             after: str = "") -> tuple[list[bytes], str]:
    """Run the helper on a pty in new UTS, network and mount namespaces (`setup` and
    `after`: shell run there before it starts and once it answered; /etc/hostname is a
    scratch file there); its replies and `after`'s output."""
    master, slave = os.openpty()
    tty.setraw(slave)
    port = os.ttyname(slave)
    scratch = helper.parent / "hostname"
    scratch.write_text("an-old-name-longer-than-the-new\n")  # the rewrite must cut it
    script = (f"mount --bind {scratch} /etc/hostname\n{setup}\n{helper} {port} & pid=$!\n"
              f"read -r _\n{after}\nkill $pid")
    proc = subprocess.Popen(["unshare", "--uts", "--net", "--mount", "sh", "-c", script],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for request in requests:
            os.write(master, request)
        data = b""
        while len(data) < replies * identity.REPLY.size:
            data += os.read(master, 4096)
        out, _ = proc.communicate("go\n", timeout=10)
    finally:
        proc.kill()
        os.close(master)
        os.close(slave)
    size = identity.REPLY.size
    return [data[i:i + size] for i in range(0, len(data), size)], out


def test_the_helper_sets_hostname_mac_and_randomness(helper: Path) -> None:
    who = identity.new_identity("fork-7", "52:54:00:12:34:56")
    replies, out = exchange(
        helper, [identity.encode(41, None, who)], 1,
        setup="ip link add eth0 type veth peer name eth1 && ip link set eth0 up",
        after="hostname; cat /etc/hostname; ip -o link show eth0 | grep -o 'ether [^ ]*'")
    nonce, step, result, guest_time = identity.decode(replies[0])
    assert (nonce, step, result) == (41, 0, 0)
    assert out.split() == ["fork-7", "fork-7", "ether", "52:54:00:12:34:56"]
    assert guest_time > 0  # the clock read before any change


def test_a_step_the_kernel_refuses_is_named_with_its_errno(helper: Path) -> None:
    # An invalid timespec (nanoseconds past a second): clock_settime says EINVAL and
    # nothing after the clock step runs; the next request is still answered.
    bad_clock = bytearray(identity.encode(1, 0, identity.new_identity("nope", "52:54:00:00:00:01")))
    struct.pack_into("<q", bad_clock, 24, 2_000_000_000)
    replies, out = exchange(helper, [bytes(bad_clock), identity.encode(2, None, None)], 2,
                            after="hostname")
    assert identity.decode(replies[0])[:3] == (1, 1, -22)
    assert identity.decode(replies[1])[:3] == (2, 0, 0)  # a ping: nothing to do
    assert out.strip() != "nope"


def test_no_eth0_fails_the_mac_step(helper: Path) -> None:
    replies, out = exchange(helper, [identity.encode(3, None, identity.new_identity(
        "named", "52:54:00:00:00:02"))], 1, after="hostname")
    assert identity.decode(replies[0])[:3] == (3, 3, -19)  # ENODEV, after the hostname
    assert out.strip() == "named"


def test_garbage_is_refused_and_the_helper_goes_on(helper: Path) -> None:
    replies, _ = exchange(helper, [bytes(identity.REQUEST.size),
                                   identity.encode(4, None, None)], 2)
    assert identity.decode(replies[0])[1:3] == (5, -22)
    assert identity.decode(replies[1])[:3] == (4, 0, 0)


if __name__ == "__main__":
    sys.stdout.write(printf_line(assemble()) + "\n")


# --- the host's side (guest/identity.apply) on real FIFOs held as QEMU holds them -------

@pytest.fixture
def port(tmp_path: Path) -> Iterator[Path]:
    pipe = tmp_path / "identity"
    held = []
    for end in (".in", ".out"):
        os.mkfifo(f"{pipe}{end}")
        held.append(os.open(f"{pipe}{end}", os.O_RDWR))  # QEMU's chardev: read-write
    yield pipe
    for fd in held:
        os.close(fd)


def answer_after_a_stale_reply(pipe: Path) -> None:
    """A guest that answers an old request first: that reply must be skipped."""
    with open(f"{pipe}.in", "rb", buffering=0) as requests, \
            open(f"{pipe}.out", "wb", buffering=0) as replies:
        request = requests.read(identity.REQUEST.size)
        nonce = identity.REQUEST.unpack(request)[2]
        replies.write(identity.REPLY.pack(identity.REPLY_MAGIC, 0, nonce ^ 1, 0, 1, 0))
        replies.write(identity.REPLY.pack(identity.REPLY_MAGIC, 0, nonce, 0, 7, 5))


def test_apply_skips_replies_to_other_requests(port: Path) -> None:
    guest = threading.Thread(target=answer_after_a_stale_reply, args=(port,))
    guest.start()
    applied = asyncio.run(identity.apply(port, timeout=5))
    guest.join()
    assert applied.guest_time_ns == 7 * 10**9 + 5


def test_apply_names_a_silent_or_missing_helper(port: Path, tmp_path: Path) -> None:
    with pytest.raises(identity.IdentityError, match="did not answer within 1 s"):
        asyncio.run(identity.apply(port, timeout=1))
    with pytest.raises(identity.IdentityError, match="identity port is missing"):
        asyncio.run(identity.apply(tmp_path / "nothing", timeout=1))
