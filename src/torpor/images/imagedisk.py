"""An OCI image as a bootable VM disk, and what each instance of it runs.

The disk: the image's layers unpacked by umoci (whiteouts and opaque directories applied,
ownership kept), torpor's carried-in tree added as /.torpor (static busybox, qemu-ga with
its own loader and libraries, the init), and an ext4 filesystem made from the directory by
`mkfs.ext4 -d`: no loop mount, sparse. Built once per image digest and carried-in recipe;
instances copy it (reflink where the filesystem can) and grow it to their disk size.

What an instance runs is a shell fragment, /.torpor/config.sh, written into its own disk
by debugfs (again no mount): its hostname, and `run_main` / `run_agent`, which exec the
image's command and torpor's agent with the image's environment.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, Field

from torpor.errors import InvalidArgument, OperationFailed
from torpor.fsutil import fsync_dir, owned_name
from torpor.images.builtin import KERNEL_CMDLINE, builtin_image_dir, recipe_hash
from torpor.images.oci import DEFAULT_PATH, ImageRecord, ImageStore

TORPOR_DIR = ".torpor"  # in the image's root
IMAGE_CMDLINE = f"{KERNEL_CMDLINE} torpor.init=/{TORPOR_DIR}/init"
# torpor's dynamically linked tools run through their own loader and libraries.
LOADER = f"/{TORPOR_DIR}/lib/ld-linux-x86-64.so.2 --library-path /{TORPOR_DIR}/lib"
AGENT = f"{LOADER} /{TORPOR_DIR}/bin/qemu-ga"
# Tools torpor runs in an image instance (fork identity): its own, not the image's.
GUEST_SHELL = (f"/{TORPOR_DIR}/bin/sh", "-c")
GUEST_TOOLS_PATH = f"/{TORPOR_DIR}/bin"
CONFIG_PATH = f"/{TORPOR_DIR}/config.sh"
MOUNT_POINTS = {"dev": 0o755, "proc": 0o555, "sys": 0o555, "run": 0o755, "tmp": 0o1777}
SLACK = 256 << 20  # free space in a fresh image disk beyond its files (and the journal)


def _init_script() -> bytes:
    return resources.files("torpor.images").joinpath("image-init.sh").read_bytes()


def carry_hash() -> str:
    """Names what torpor puts into an image's disk: a new recipe or init, new disks."""
    return hashlib.sha256(recipe_hash().encode() + _init_script()).hexdigest()[:12]


def ensure_image_disk(store: ImageStore, record: ImageRecord) -> Path:
    data_root = store.data_root
    disk = data_root.image_disk(record.hex, carry_hash())
    if disk.exists():
        return disk
    carry = builtin_image_dir() / "carry"
    if not carry.is_dir():
        raise OperationFailed(f"torpor's carried-in agent is missing ({carry}): "
                              "run `torpor image build`")
    with store.locked():
        if disk.exists():
            return disk
        staging = data_root.staging(owned_name(f"imagedisk-{record.hex[:12]}"))
        try:
            staging.mkdir(parents=True)
            rootfs = staging / "rootfs"
            _run([store.umoci, "raw", "unpack", "--image",
                  f"{data_root.oci_layout}:{record.tag}", str(rootfs)], "unpacking the image")
            _carry_in(rootfs, carry)
            size = _disk_size(rootfs)
            built = staging / "disk.ext4"
            _run(["mkfs.ext4", "-q", "-F", "-L", "torpor-image", "-d", str(rootfs),
                  str(built), f"{size // 1024}k"], "making the image's filesystem")
            with open(built, "rb+") as f:
                os.fsync(f.fileno())
            disk.parent.mkdir(parents=True, exist_ok=True)
            os.rename(built, disk)
            fsync_dir(disk.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return disk


def _carry_in(rootfs: Path, carry: Path) -> None:
    # The mount points init needs (a scratch or distroless image may have none of them).
    for name, mode in MOUNT_POINTS.items():
        point = rootfs / name
        if not point.exists() and not point.is_symlink():
            point.mkdir(mode=mode)
            point.chmod(mode)
    target = rootfs / TORPOR_DIR
    if target.is_symlink() or target.is_file():  # never follow an image's link out
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    shutil.copytree(carry, target, symlinks=True)
    (target / "init").write_bytes(_init_script())
    (target / "init").chmod(0o755)
    (target / "config.sh").write_text("run_main() { exit 127; }\n")
    target.chmod(0o755)


def _disk_size(rootfs: Path) -> int:
    used = 0
    for root, dirs, files in os.walk(rootfs):
        for name in files + dirs:
            try:
                used += os.lstat(os.path.join(root, name)).st_blocks * 512 + 4096
            except OSError:
                pass
    size = int(used * 1.25) + SLACK
    return (size + (4 << 20) - 1) // (4 << 20) * (4 << 20)


def _run(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, check=False)
    if result.returncode != 0:
        detail = " ".join(result.stderr.decode(errors="replace").split())[-400:]
        raise OperationFailed(f"{what} failed: {detail}")


# --- what an instance runs ----------------------------------------------------------------

class RunSpec(BaseModel):
    """The image's command as this instance runs it (the image's config with the
    create request's overrides; its User resolved against the image's own accounts)."""

    argv: list[str]
    env: list[str] = Field(default_factory=list)
    workdir: str = "/"
    user: str = ""  # as given
    uid: int = 0
    gid: int = 0
    groups: list[int] = Field(default_factory=list)  # supplementary


class Accounts(BaseModel):
    """The image's /etc/passwd and /etc/group, read from its disk (debugfs, no mount)."""

    passwd: list[list[str]] = Field(default_factory=list)
    group: list[list[str]] = Field(default_factory=list)

    @classmethod
    def of_disk(cls, disk: Path) -> Accounts:
        def table(path: str, fields: int) -> list[list[str]]:
            result = subprocess.run(["debugfs", "-R", f"cat {path}", str(disk)],
                                    capture_output=True, check=False)
            rows = [line.split(":") for line in
                    result.stdout.decode(errors="replace").splitlines()]
            return [row for row in rows if len(row) >= fields]
        return cls(passwd=table("/etc/passwd", 7), group=table("/etc/group", 4))

    def user(self, spec: str) -> tuple[int, int, list[int], str | None]:
        """uid, gid, supplementary gids and home for a User field (Docker's forms:
        name, uid, name:group, uid:gid)."""
        name, _, group = spec.partition(":")
        entry = next((row for row in self.passwd if name in (row[0], row[2])), None)
        if entry is None and not name.isdigit():
            raise InvalidArgument(f"user {name!r} is not in the image's /etc/passwd")
        uid = int(entry[2]) if entry else int(name)
        gid = int(entry[3]) if entry else 0
        if group:
            found = next((row for row in self.group if group in (row[0], row[2])), None)
            if found is None and not group.isdigit():
                raise InvalidArgument(f"group {group!r} is not in the image's /etc/group")
            gid = int(found[2]) if found else int(group)
        member_of = [int(row[2]) for row in self.group
                     if entry is not None and entry[0] in row[3].split(",")]
        return uid, gid, member_of, entry[5] if entry else None


def resolve_run(record: ImageRecord, accounts: Accounts, *,
                entrypoint: list[str] | None = None, cmd: list[str] | None = None,
                env: list[str] | None = None, workdir: str | None = None,
                user: str | None = None) -> RunSpec:
    """Docker's rules: a new entrypoint drops the image's command unless one is given."""
    config = record.config
    if entrypoint is not None:
        argv = entrypoint + (cmd or [])
    else:
        argv = config.entrypoint + (cmd if cmd is not None else config.cmd)
    if not argv:
        raise InvalidArgument(f"image {record.references[0] if record.references else ''} "
                              "has no Entrypoint or Cmd: give --cmd")
    merged: dict[str, str] = {}
    for item in config.env + (env or []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--env {item!r}: use KEY=VALUE")
        merged[key] = value
    run_user = user if user is not None else config.user
    uid, gid, groups, home = accounts.user(run_user) if run_user else (0, 0, [], "/root")
    merged.setdefault("PATH", DEFAULT_PATH)
    merged.setdefault("HOME", home or "/")
    return RunSpec(argv=argv, env=[f"{k}={v}" for k, v in merged.items()],
                   workdir=workdir or config.workdir or "/", user=run_user, uid=uid, gid=gid,
                   groups=groups)


def render_run_config(spec: RunSpec, hostname: str) -> str:
    env = " ".join(shlex.quote(e) for e in [*spec.env, f"HOSTNAME={hostname}"])
    as_user = ""
    if (spec.uid, spec.gid) != (0, 0):
        groups = (f"--groups={','.join(map(str, spec.groups))}" if spec.groups
                  else "--clear-groups")
        as_user = (f"{LOADER} /{TORPOR_DIR}/bin/setpriv --reuid={spec.uid} "
                   f"--regid={spec.gid} {groups} -- ")
    argv = " ".join(shlex.quote(a) for a in spec.argv)
    return (
        "# Written by torpor for this instance (torpor create); read by /.torpor/init.\n"
        f"TORPOR_HOSTNAME={shlex.quote(hostname)}\n"
        f"run_agent() {{ exec /{TORPOR_DIR}/bin/env -i {env} {AGENT} \"$@\"; }}\n"
        f"run_main() {{\n"
        f"  cd {shlex.quote(spec.workdir)} || exit 126\n"
        f"  exec /{TORPOR_DIR}/bin/env -i {env} {as_user}{argv}\n"
        "}\n")


def write_run_config(disk: Path, text: str) -> None:
    """Into an instance's (unmounted) disk, checked by reading it back."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as source, \
            tempfile.NamedTemporaryFile("w", suffix=".debugfs") as commands:
        source.write(text)
        source.flush()
        os.chmod(source.name, 0o644)
        commands.write(f"cd /{TORPOR_DIR}\nrm config.sh\nwrite {source.name} config.sh\n")
        commands.flush()
        _run(["debugfs", "-w", "-f", commands.name, str(disk)], "writing the run config")
    result = subprocess.run(["debugfs", "-R", f"cat /{TORPOR_DIR}/config.sh", str(disk)],
                            capture_output=True, check=False)
    if result.stdout.decode(errors="replace") != text:
        raise OperationFailed(f"writing the run config into {disk} failed")
