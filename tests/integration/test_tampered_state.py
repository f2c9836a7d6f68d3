"""Corrupted or tampered saved state is refused, with the state kept: never a resumed VM
with the wrong memory, never a hang, never a QEMU left behind.

One table: each row damages a fresh standby state in one way and names the refusal it
must get. After each row the damage is undone and the same state restores with the
guest's RAM and disk intact, which proves the refusal kept it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import read_marks, run, sh, write_marks
from torpor.codec import Codec
from torpor.errors import OperationFailed
from torpor.instances import InstanceState
from torpor.instances.metadata import CompressionPolicy
from torpor.manager import InstanceManager
from torpor.paths import InstancePaths

pytestmark = pytest.mark.qemu

Tamper = Callable[[InstancePaths], None]


def flip_byte(path: Path, offset: int | None = None) -> None:
    with open(path, "r+b") as f:
        f.seek(offset if offset is not None else os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def truncate_half(path: Path) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def edit_manifest(change: Callable[[dict], None]) -> Tamper:  # type: ignore[type-arg]
    def tamper(paths: InstancePaths) -> None:
        manifest = paths.standby_dir / "manifest.json"
        data = json.loads(manifest.read_text())
        change(data)
        manifest.write_text(json.dumps(data))
    return tamper


def wrong_memory(data: dict) -> None:  # type: ignore[type-arg]
    data["vm_config"]["memory_mib"] *= 2
    data["guest_visible"]["memory_mib"] *= 2


def garbage(path: Path, keep_header: bool = False) -> None:
    size = os.path.getsize(path)
    head = path.read_bytes()[:16] if keep_header else b""
    path.write_bytes(head + os.urandom(size - len(head)))


def zero_filled_copy(path: Path) -> None:
    """The RAM file replaced by one of the right size holding nothing."""
    size = os.path.getsize(path)
    path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)


@dataclass
class Row:
    name: str
    mode: str  # "anonymous" or "file"
    codec: Codec
    tamper: Tamper
    refusal: str  # a regular expression the error must match

    def __str__(self) -> str:
        return self.name


ROWS = [
    Row("truncated", "anonymous", Codec.NONE,
        lambda p: truncate_half(p.standby_dir / "machine-state"), "checksum"),
    Row("flipped-byte", "anonymous", Codec.NONE,
        lambda p: flip_byte(p.standby_dir / "machine-state"), "checksum"),
    Row("manifest-removed", "anonymous", Codec.NONE,
        lambda p: (p.standby_dir / "manifest.json").unlink(), "has no manifest.json"),
    Row("wrong-qemu-version", "anonymous", Codec.NONE,
        edit_manifest(lambda d: d.update(qemu_version="6.0.0")), "written by QEMU 6.0.0"),
    Row("wrong-memory-size", "anonymous", Codec.NONE,
        edit_manifest(wrong_memory), "needs a different VM config: memory_mib"),
    Row("garbage-zst", "anonymous", Codec.ZSTD,
        lambda p: garbage(p.standby_dir / "machine-state.zst"), "checksum"),
    Row("zst-header-then-junk", "anonymous", Codec.ZSTD,
        lambda p: garbage(p.standby_dir / "machine-state.zst", keep_header=True), "checksum"),
    # No checksum (a crash between the save and its persist leaves none): the decompressor
    # is what finds the damage, and its failure is the error, at once, not a hung load.
    Row("garbage-zst-unchecked", "anonymous", Codec.ZSTD,
        lambda p: (garbage(p.standby_dir / "machine-state.zst"),
                   edit_manifest(lambda d: d["state"].update(checksum=None))(p)),
        "zstd could not decompress machine-state.zst"),
    Row("zst-header-then-junk-unchecked", "anonymous", Codec.ZSTD,
        lambda p: (garbage(p.standby_dir / "machine-state.zst", keep_header=True),
                   edit_manifest(lambda d: d["state"].update(checksum=None))(p)),
        "zstd could not decompress machine-state.zst"),
    Row("lz4-header-then-junk", "anonymous", Codec.LZ4,
        lambda p: garbage(p.standby_dir / "machine-state.lz4", keep_header=True), "checksum"),
    Row("lz4-header-then-junk-unchecked", "anonymous", Codec.LZ4,
        lambda p: (garbage(p.standby_dir / "machine-state.lz4", keep_header=True),
                   edit_manifest(lambda d: d["state"].update(checksum=None))(p)),
        "lz4 could not decompress machine-state.lz4"),
    Row("shorter-memory-file", "file", Codec.NONE,
        lambda p: truncate_half(p.memory_file), "has [0-9]+ bytes; the saved state needs"),
    Row("zero-filled-memory-file", "file", Codec.NONE,
        lambda p: zero_filled_copy(p.memory_file), "replaced or written to"),
    Row("memory-file-written-in-place", "file", Codec.NONE,
        lambda p: flip_byte(p.memory_file, 4096 * 100), "replaced or written to"),
]


@pytest.fixture(scope="module")
def guests(manager: InstanceManager) -> Iterator[dict[str, str]]:
    names = {"anonymous": "tamper-anon", "file": "tamper-file"}
    for mode, name in names.items():
        run(manager.create(name, memory_bytes=256 << 20, memory_backing=mode))  # type: ignore[arg-type]
        run(manager.start(name))
    yield names
    for name in names.values():
        run(manager.delete(name, force=True))


def snapshot_files(paths: InstancePaths, tmp: Path) -> Path:
    """A copy of everything the tampering may touch (the state and the RAM file)."""
    backup = tmp / "backup"
    shutil.rmtree(backup, ignore_errors=True)
    shutil.copytree(paths.standby_dir, backup / "latest")
    if paths.memory_file.exists():
        shutil.copy2(paths.memory_file, backup / "memory")
    return backup


def put_back(paths: InstancePaths, backup: Path) -> None:
    shutil.rmtree(paths.standby_dir)
    shutil.copytree(backup / "latest", paths.standby_dir)
    if (backup / "memory").exists():
        paths.memory_file.unlink(missing_ok=True)
        shutil.copy2(backup / "memory", paths.memory_file)


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_tampered_state_is_refused_and_kept(manager: InstanceManager, guests: dict[str, str],
                                             row: Row, tmp_path: Path) -> None:
    name = guests[row.mode]
    if run(manager.get(name)).state is not InstanceState.RUNNING:  # a row before failed
        run(manager.stop(name, force=True))
        run(manager.start(name))
    marks = write_marks(manager, name, disk_mib=1)
    run(manager.standby(name, CompressionPolicy(codec=row.codec)))
    paths = manager.paths(name)
    backup = snapshot_files(paths, tmp_path)
    row.tamper(paths)
    with pytest.raises(OperationFailed, match=row.refusal):
        run(manager.restore(name))
    assert run(manager.get(name)).state is InstanceState.STANDBY  # kept, still standby
    # No QEMU, nothing partial: at most the damage itself, which check names.
    damage = {"bad-manifest", "state-size", "missing-state"}
    assert {p.kind for p in run(manager.check())} <= damage
    if row.mode == "file":
        # A RAM file's identity cannot be put back by copying it (that is the point of the
        # check): the user discards the damaged state and boots; the disk is intact.
        run(manager.stop(name, force=True))
        assert run(manager.get(name)).state is InstanceState.STOPPED
        run(manager.start(name))
        assert sh(manager, name, "md5sum /root/disk.bin").split()[0] == marks.split()[2]
        return
    put_back(paths, backup)
    run(manager.restore(name))  # the kept state, undamaged, is the guest as it was
    assert read_marks(manager, name) == marks
