"""Choosing the accelerator: KVM when it really works, TCG otherwise.

/dev/kvm existing is not enough: on nested hosts (kvm_pvm here) stock guest kernels
never finish booting. `auto` therefore boots the given kernel once under KVM with a
short timeout and keeps KVM only if the guest reports in; the verdict is cached, in
the data root and for the host (a test suite or a host with many data roots probes once).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torpor.fsutil import atomic_write_json, read_json
from torpor.hypervisor.vmconfig import DEFAULT_CPU_MODEL, Accel

AccelChoice = Literal["auto", "kvm", "tcg"]
PROBE_MARKER = "torpor-probe-ok"
PROBE_TIMEOUT = 6.0  # under working KVM the initrd is reached in well under 1 s


def kvm_device_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def probe_kvm(kernel: Path, initrd: Path | None, binary: str = "qemu-system-x86_64",
              timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot `kernel` under KVM; the guest's initrd prints PROBE_MARKER when
    `torpor.probe` is on its command line. Returns (works, reason)."""
    if not kvm_device_usable():
        return False, "/dev/kvm missing or not accessible"
    with tempfile.TemporaryDirectory(prefix="torpor-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial.log"
        argv = [binary, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-machine", "q35", "-accel", "kvm", "-cpu", DEFAULT_CPU_MODEL, "-m", "256M",
                "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 torpor.probe",
                "-serial", f"file:{serial}"]
        if initrd:
            argv += ["-initrd", str(initrd)]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
                if serial.exists() and PROBE_MARKER in serial.read_text(errors="replace"):
                    return True, "guest booted under KVM"
                if proc.returncode is not None:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    return False, f"QEMU exited under KVM: {err.strip()[-300:]}"
            return False, f"guest did not boot under KVM within {timeout:.0f} s"
        finally:
            if proc.returncode is None:
                proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()


def resolve_accel(choice: AccelChoice, *, kernel: Path, initrd: Path | None,
                  cache_file: Path, host_cache: Callable[[str], Path],
                  binary: str = "qemu-system-x86_64") -> Accel:
    """kvm/tcg are taken as given; auto probes once and caches the verdict in
    `cache_file` (the data root's, keyed by the kernel's path). `host_cache` (the kernel's
    SHA-256 → a file outside any data root) keeps it for the host: a new data root with
    the same kernel reads it there instead of booting the kernel for 6 s once more."""
    if choice != "auto":
        return choice
    host = _host_facts(binary)
    key = {**host, "kernel": str(kernel), "kernel_mtime": kernel.stat().st_mtime_ns}
    verdict = _cached(cache_file, key)
    if verdict is None:
        verdict = _host_verdict(host, kernel, initrd, binary, host_cache)
        _store(cache_file, key, verdict)
    return "kvm" if verdict.kvm_works else "tcg"


@dataclass(frozen=True)
class Verdict:
    kvm_works: bool
    reason: str


def _host_verdict(host: dict[str, Any], kernel: Path, initrd: Path | None, binary: str,
                  host_cache: Callable[[str], Path]) -> Verdict:
    """The host's verdict for this kernel (by content: each data root has its own copy),
    probed if there is none."""
    with open(kernel, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    cache, key = host_cache(digest), {**host, "kernel_sha256": digest}
    verdict = _cached(cache, key)
    if verdict is None:
        verdict = Verdict(*probe_kvm(kernel, initrd, binary))
        _store(cache, key, verdict)
    return verdict


def _host_facts(binary: str) -> dict[str, Any]:
    """What a verdict holds for besides the kernel: a new QEMU or host kernel (its KVM)
    may decide otherwise."""
    path = shutil.which(binary)
    return {"kvm_device": kvm_device_usable(), "binary": path or binary,
            "binary_mtime": Path(path).stat().st_mtime_ns if path else None,
            "host_kernel": os.uname().release}


def _cached(cache_file: Path, key: dict[str, Any]) -> Verdict | None:
    try:
        cached = read_json(cache_file)
        if cached.get("key") == key:
            return Verdict(bool(cached["kvm_works"]), str(cached.get("reason", "")))
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # none, unreadable or another shape: probe
    return None


def _store(cache_file: Path, key: dict[str, Any], verdict: Verdict) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache_file, {"key": key, "kvm_works": verdict.kvm_works,
                                   "reason": verdict.reason, "probed_at": time.time()})
