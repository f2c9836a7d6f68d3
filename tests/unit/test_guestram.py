"""hypervisor/guestram.py on a real process mapping a real sparse file."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import mapped_bytes
from torpor.hypervisor import guestram

MIB = 1 << 20
MAPPER = """
import mmap, sys
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
print("mapped", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def sparse(tmp_path: Path) -> Path:
    """16 MiB with data at 1-3 MiB and 9-10 MiB; holes elsewhere."""
    path = tmp_path / "memory"
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
        f.seek(1 * MIB)
        f.write(b"\x01" * (2 * MIB))
        f.seek(9 * MIB)
        f.write(b"\x02" * MIB)
    return path


@pytest.fixture
def mapper(sparse: Path) -> Iterator[subprocess.Popen[str]]:
    child = subprocess.Popen([sys.executable, "-c", MAPPER, str(sparse)], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == "mapped\n"
    yield child
    child.kill()
    child.wait()


def test_the_files_data_is_mapped_into_the_process_and_its_holes_are_not(
        sparse: Path, mapper: subprocess.Popen[str]) -> None:
    assert guestram.mapping_of(mapper.pid, sparse) is not None
    assert mapped_bytes(mapper.pid, sparse) == 0  # nothing touched yet
    covered = guestram.map_in(mapper.pid, sparse)
    assert covered == 3 * MIB  # one read per 64 KiB of data
    assert mapped_bytes(mapper.pid, sparse) == 3 * MIB  # every data page; no hole


def test_a_process_gone_or_not_mapping_the_file_is_left_alone(
        sparse: Path, tmp_path: Path, mapper: subprocess.Popen[str]) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"x" * MIB)
    assert guestram.mapping_of(mapper.pid, other) is None
    assert guestram.map_in(mapper.pid, other) == 0
    mapper.kill()
    mapper.wait()
    assert guestram.map_in(mapper.pid, sparse) == 0
