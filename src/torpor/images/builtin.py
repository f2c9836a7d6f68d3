"""The built-in default guest.

Built by `build-guest.sh` (shipped in this package) from Debian packages only and
cached under ~/.cache/torpor/guest/<recipe-hash>/; the hash covers the script, so
changing the recipe rebuilds and an unchanged recipe never does. The build goes into a
staging directory that is renamed into place, so a cache entry is complete or absent.

Why q35 + PVH vmlinux: booting the extracted ELF through its PVH entry skips the
bzImage decompressor; q35 (not microvm) gives PCI virtio devices, ACPI and vmgenid,
which forks need, for ~0.5 s more boot under TCG (measured: ~2.1 s to agent).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from pydantic import BaseModel

from torpor.errors import OperationFailed
from torpor.paths import cache_home

# acpi_mask_gpe=0x05: QEMU raises GPE 5 (its VM generation ID changed) on every load of a
# state, and this kernel has no driver for it (no CONFIG_VIRT_DRIVERS; forks reseed their
# RNG through /sbin/torpor-reseed instead): the ACPI interpreter ran, cold under TCG, for
# nothing, ~8 ms of each restore's wait for the agent. Masked, QEMU raises no interrupt.
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1 rw acpi_mask_gpe=0x05"


class GuestImage(BaseModel):
    """The boot files of a guest image."""

    name: str
    kernel: Path
    initrd: Path | None
    rootfs: Path
    cmdline: str


def _recipe_script() -> bytes:
    return resources.files("torpor.images").joinpath("build-guest.sh").read_bytes()


def recipe_hash() -> str:
    return hashlib.sha256(_recipe_script()).hexdigest()[:16]


def builtin_image_dir() -> Path:
    return cache_home() / "guest" / recipe_hash()


def builtin_image() -> GuestImage:
    d = builtin_image_dir()
    return GuestImage(name="builtin", kernel=d / "vmlinux", initrd=d / "initrd.img",
                      rootfs=d / "rootfs.ext4", cmdline=KERNEL_CMDLINE)


def is_built() -> bool:
    image = builtin_image()
    return all(p.exists() for p in (image.kernel, image.rootfs, image.initrd) if p)


def ensure_builtin_image(quiet: bool = False) -> GuestImage:
    """Build the default guest if its recipe's cache entry is missing."""
    if is_built():
        return builtin_image()
    target = builtin_image_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others wait for it
        if is_built():
            return builtin_image()
        staging = target.parent / f".staging-{target.name}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        script = staging / "build-guest.sh"
        script.write_bytes(_recipe_script())
        started = time.monotonic()
        if not quiet:
            print(f"building the default guest into {target} ...", file=sys.stderr)
        result = subprocess.run(["bash", str(script), str(staging)], capture_output=quiet,
                                check=False)
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            detail = result.stderr.decode(errors="replace")[-2000:] if quiet else ""
            raise OperationFailed(f"building the default guest failed\n{detail}")
        script.unlink()
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        if not quiet:
            print(f"default guest built in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return builtin_image()
