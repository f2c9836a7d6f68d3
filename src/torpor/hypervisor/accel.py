"""Choosing the accelerator: KVM when it really works, TCG otherwise.

/dev/kvm existing is not enough: on nested hosts (kvm_pvm here) stock guest kernels
never finish booting. `auto` therefore boots the given kernel once under KVM with a
short timeout and keeps KVM only if the guest reports in; the verdict is cached.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

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
                  cache_file: Path, binary: str = "qemu-system-x86_64") -> Accel:
    """kvm/tcg are taken as given; auto probes once and caches the verdict."""
    if choice != "auto":
        return choice
    key = {"kernel": str(kernel), "kernel_mtime": kernel.stat().st_mtime_ns,
           "kvm_device": kvm_device_usable(), "binary": binary}
    try:
        cached = read_json(cache_file)
        if cached.get("key") == key:
            return "kvm" if cached["kvm_works"] else "tcg"
    except (FileNotFoundError, ValueError, KeyError):
        pass
    works, reason = probe_kvm(kernel, initrd, binary)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache_file, {"key": key, "kvm_works": works, "reason": reason,
                                   "probed_at": time.time()})
    return "kvm" if works else "tcg"
