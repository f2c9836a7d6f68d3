"""The guest's identity helper (`torpor-identity`, in the default guest and the tree
carried into OCI images): a resident program on its own virtio port that sets the wall
clock, hostname, MAC and randomness with system calls when the host asks, and answers.

A restore asks it for the clock, a fork for everything, right after the VM resumes: no
agent round trips and no process started in the guest (qemu-ga's `guest-set-time` forks
hwclock; the identity script ran `sh`, `ip` and the reseeder: hundreds of ms per fork
under TCG). The port's host side is a pair of FIFOs QEMU holds open read-write (its
`pipe` chardev: the host end is always connected, so the guest's read blocks instead of
returning end of file): we write requests into `<pipe>.in` and read replies from
`<pipe>.out`. Each request carries a nonce its reply repeats; anything else found there
(a reply that came after its requester gave up) is skipped. The layout is the helper's
(images/torpor-identity.S).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from torpor.errors import OperationFailed
from torpor.hypervisor.vmconfig import pipe_fifos

REQUEST = struct.Struct("<IIQqq40sQ64s32s")
REPLY = struct.Struct("<IIQqqq")
REQUEST_MAGIC, REPLY_MAGIC = 0x44495054, 0x4B4F5054  # "TPID", "TPOK"
CLOCK, HOSTNAME, MAC, RANDOMNESS = 1, 2, 4, 8
STEPS = {1: "the clock", 2: "the hostname", 3: "the MAC", 4: "the randomness",
         5: "the request"}
INTERFACE = "eth0"  # the NIC of the default guest and of OCI images
ARPHRD_ETHER = 1
RANDOM_BYTES = 32


class IdentityError(OperationFailed):
    pass


@dataclass(frozen=True)
class Identity:
    """What makes a fork itself inside the guest."""

    hostname: str
    mac: str | None  # None: no NIC to set it on
    randomness: bytes


def new_identity(hostname: str, mac: str | None) -> Identity:
    return Identity(hostname, mac, secrets.token_bytes(RANDOM_BYTES))


@dataclass(frozen=True)
class Applied:
    guest_time_ns: int  # the guest's wall clock when the helper took the request
    sent_time_ns: int  # the host's, as written into the request


def encode(nonce: int, time_ns: int | None, identity: Identity | None) -> bytes:
    flags = CLOCK if time_ns is not None else 0
    seconds, nanoseconds = divmod(time_ns or 0, 1_000_000_000)
    ifreq = hostname = randomness = b""
    if identity is not None:
        flags |= HOSTNAME | RANDOMNESS
        hostname = identity.hostname.encode()
        randomness = identity.randomness
    if identity is not None and identity.mac is not None:
        flags |= MAC
        ifreq = (INTERFACE.encode().ljust(16, b"\0") + struct.pack("<H", ARPHRD_ETHER)
                 + bytes.fromhex(identity.mac.replace(":", "")))
    return REQUEST.pack(REQUEST_MAGIC, flags, nonce, seconds, nanoseconds, ifreq,
                        len(hostname), hostname + b"\n", randomness)


def decode(reply: bytes) -> tuple[int, int, int, int]:
    """(nonce, failed step, result, the guest's time in ns) of one reply."""
    magic, step, nonce, result, seconds, nanoseconds = REPLY.unpack(reply)
    if magic != REPLY_MAGIC:
        raise IdentityError("the guest's identity helper answered garbage")
    return nonce, step, result, seconds * 1_000_000_000 + nanoseconds


async def apply(pipe: Path, *, identity: Identity | None = None,
                timeout: float = 10.0) -> Applied:
    """Have the helper behind `pipe` set the clock to the host's (and `identity`);
    IdentityError if it refused a step or did not answer within `timeout`."""
    nonce = secrets.randbits(64)
    try:
        replies = os.open(pipe_fifos(pipe)[1], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise IdentityError(f"the guest's identity port is missing: {exc}") from exc
    try:
        _drain(replies)  # what came after an earlier requester gave up
        sent = time.time_ns()
        _send(pipe, encode(nonce, sent, identity))
        step, result, guest_time = await _reply(replies, nonce, timeout)
    finally:
        os.close(replies)
    if step:
        raise IdentityError(f"the guest's identity helper could not set "
                            f"{STEPS.get(step, f'step {step}')}: {os.strerror(-result)}")
    return Applied(guest_time, sent)


def _send(pipe: Path, request: bytes) -> None:
    try:
        fd = os.open(pipe_fifos(pipe)[0], os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:  # ENXIO: no QEMU holds the pipe
        raise IdentityError(f"the guest's identity port is not open: {exc}") from exc
    try:
        os.write(fd, request)  # less than PIPE_BUF: all or nothing
    except BlockingIOError as exc:
        raise IdentityError("the guest's identity helper is not reading its port") from exc
    finally:
        os.close(fd)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 65536):
            pass


async def _reply(fd: int, nonce: int, timeout: float) -> tuple[int, int, int]:
    loop = asyncio.get_running_loop()
    readable = asyncio.Event()
    loop.add_reader(fd, readable.set)
    pending = b""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await readable.wait()
                readable.clear()
                try:
                    pending += os.read(fd, 4096)
                except BlockingIOError:
                    continue
                while len(pending) >= REPLY.size:
                    got, step, result, guest_time = decode(pending[:REPLY.size])
                    pending = pending[REPLY.size:]
                    if got == nonce:
                        return step, result, guest_time
    except TimeoutError:
        raise IdentityError(f"the guest's identity helper did not answer within "
                            f"{timeout:.0f} s") from None
    finally:
        loop.remove_reader(fd)

