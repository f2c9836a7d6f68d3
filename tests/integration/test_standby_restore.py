"""Standby and restore on real guests: state survives, failures leave the VM safe."""

from __future__ import annotations

import asyncio
import contextlib
import filecmp
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EMPTY_MD5, booted, run, running, sh, torpor_cli
from torpor import faults
from torpor.codec import Codec, checksum_file
from torpor.errors import IntegrityError, OperationFailed, WrongState
from torpor.guest.agent import GuestAgent
from torpor.hypervisor.process import ProcessIdentity
from torpor.hypervisor.qmp import Monitor
from torpor.hypervisor.vmconfig import pipe_fifos
from torpor.images.builtin import GuestImage
from torpor.instances import InstanceState
from torpor.instances.context import Settings
from torpor.instances.metadata import CompressionPolicy
from torpor.instances.observe import Progress, ProgressObserver, observing
from torpor.instances.runtime import load_runtime
from torpor.machinestate import zeropages
from torpor.machinestate.manifest import Manifest
from torpor.manager import InstanceManager
from torpor.operations import standby as standby_module

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def booted_vm(manager: InstanceManager) -> Iterator[str]:
    """One guest for the module: standby/restore cycles leave it running."""
    yield from booted(manager, "sr")


@pytest.fixture
def vm(manager: InstanceManager, booted_vm: str) -> str:
    """Running at each test's start, whatever a failed test before it left."""
    return running(manager, booted_vm)


def fill_guest(manager: InstanceManager, name: str, ram_mib: int = 24) -> dict[str, str]:
    """Random data in guest RAM (tmpfs) and on its disk; returns their hashes + counter."""
    out = sh(manager, name, f"dd if=/dev/urandom of=/tmp/ram.bin bs=1M count={ram_mib} 2>/dev/null;"
             " dd if=/dev/urandom of=/root/disk.bin bs=1M count=4 2>/dev/null; sync;"
             " md5sum /tmp/ram.bin /root/disk.bin; cat /run/counter")
    lines = out.split("\n")
    assert EMPTY_MD5 not in out, out
    return {"ram": lines[0].split()[0], "disk": lines[1].split()[0], "counter": lines[2]}


def guest_view(manager: InstanceManager, name: str) -> dict[str, str]:
    out = sh(manager, name, "md5sum /tmp/ram.bin /root/disk.bin; cat /run/counter")
    lines = out.split("\n")
    return {"ram": lines[0].split()[0], "disk": lines[1].split()[0], "counter": lines[2]}


@pytest.mark.parametrize("codec", [Codec.NONE, Codec.ZSTD, Codec.LZ4])
def test_round_trip_keeps_ram_disk_and_processes(manager: InstanceManager, vm: str,
                                                 codec: Codec) -> None:
    before = fill_guest(manager, vm)
    pid = run(manager.get(vm)).pid
    record = load_runtime(manager.paths(vm))
    assert record is not None and pid
    info = run(manager.standby(vm, CompressionPolicy(codec=codec)))
    assert info.state is InstanceState.STANDBY and info.pid is None
    assert not record.identity.is_alive()  # QEMU is gone: its memory is released
    latest = manager.paths(vm).standby_dir
    manifest = Manifest.load(latest)
    assert manifest.state.codec is codec and manifest.state.checksum
    assert (latest / manifest.state.stored_name()).exists()
    assert info.last_operation is not None
    assert {"pause", "save", "kill", "exit", "persist", "paused_window"} <= set(
        info.last_operation.phases)
    observer = ProgressObserver()
    with observing(observer):
        restored = run(manager.restore(vm))
    assert restored.state is InstanceState.RUNNING
    load = next(s for s in observer.stages() if s.stage == "load")
    assert load.done_bytes == load.total_bytes == manifest.state.stored_bytes  # progress
    assert restored.last_operation is not None
    assert set(restored.last_operation.phases) == {"spawn", "load", "resume", "agent-ready",
                                                   "identity", "clock_behind",
                                                   "restore_to_running", "restore_to_agent",
                                                   "cleanup"}
    assert not latest.exists()  # consumed
    after = guest_view(manager, vm)
    assert (after["ram"], after["disk"]) == (before["ram"], before["disk"])
    assert int(after["counter"]) > int(before["counter"])  # the same process kept counting

    async def announce_rounds() -> int:
        async with Monitor.connect(manager.paths(vm).qmp_socket) as mon:
            return int((await mon.execute("query-migrate-parameters"))["announce-rounds"])
    assert run(announce_rounds()) == 0  # QEMU did not have the guest announce itself
    # QEMU raised GPE 5 (VM generation ID changed) as it loaded the state (STS); the
    # default guest masks it, so no ACPI interrupt ran in the guest, restore after restore.
    gpe, sci = sh(manager, vm, "cat /sys/firmware/acpi/interrupts/gpe05"
                               " /sys/firmware/acpi/interrupts/sci").splitlines()
    assert {"STS", "masked"} <= set(gpe.split()) and gpe.split()[0] == "0"
    assert sci.strip() == "0"


def test_auto_compression_stores_random_data_raw_and_restores_it(manager: InstanceManager,
                                                                  vm: str) -> None:
    """`auto`: saved raw in the paused window, then zstd frames, the chunks of random data
    stored raw (recorded in the manifest), the guest's compressible memory compressed;
    the restore feeds both."""
    before = fill_guest(manager, vm, ram_mib=32)
    latest = manager.paths(vm).standby_dir
    seen = Path(tempfile.mkdtemp()) / "in-window"
    os.environ[faults.ENV] = "standby.published=exec"  # the window ends at the kill next
    os.environ[faults.EXEC_ENV] = f"ls {latest} > {seen}"
    try:
        run(manager.standby(vm, CompressionPolicy(codec=Codec.ZSTD, store_incompressible=True)))
    finally:
        del os.environ[faults.ENV], os.environ[faults.EXEC_ENV]
    # Saved raw inside the paused window, compressed after it (before standby returned).
    assert seen.read_text().split() == ["machine-state", "manifest.json"]
    assert sorted(p.name for p in latest.iterdir()) == ["machine-state.zst", "manifest.json"]
    done = run(manager.get(vm)).last_operation
    assert done is not None and "compress" in done.phases
    state = Manifest.load(latest).state
    assert state.layout == "frames" and state.chunks and state.stored_raw_chunks is not None
    # 32 MiB of random data fill 8 chunks; pages of it share chunks with compressible ones
    assert 32 // 8 <= state.stored_raw_chunks < state.chunks
    assert state.raw_bytes is not None and state.stored_bytes < state.raw_bytes
    run(manager.restore(vm))
    after = guest_view(manager, vm)
    assert (after["ram"], after["disk"]) == (before["ram"], before["disk"])


def test_show_json_carries_last_operation(data_root: Path, manager: InstanceManager,
                                          vm: str) -> None:
    result = torpor_cli(data_root, "standby", vm, "--compress", "ZSTD", "--level", "3")
    assert result.returncode == 0, result.stderr
    shown = json.loads(torpor_cli(data_root, "show", vm, "--json").stdout)
    assert shown["state"] == "standby"
    assert shown["last_operation"]["kind"] == "standby"
    assert shown["last_operation"]["result"] == "ok"
    assert shown["last_operation"]["phases"]["save"] > 0
    assert Manifest.load(manager.paths(vm).standby_dir).state.level == 3
    assert torpor_cli(data_root, "restore", vm).returncode == 0


def test_user_errors_are_clear(data_root: Path, manager: InstanceManager, vm: str,
                               fresh_name: str) -> None:
    run(manager.create(fresh_name))
    try:
        for args, code, text in (
            (["standby", fresh_name], 4, "only a running VM can go into standby"),
            (["restore", fresh_name], 4, "has no standby state to restore"),
            (["restore", vm], 4, "has no standby state to restore (it is running)"),
            (["standby", vm, "--compress", "gzip"], 2, "unknown compression 'gzip'"),
            (["standby", vm, "--compress", "zstd", "--level", "25"], 2, "zstd level"),
            (["standby", vm, "--compress", "lz4", "--level", "13"], 2, "lz4 level"),
        ):
            result = torpor_cli(data_root, *args)
            assert result.returncode == code, (args, result.stderr)
            assert text in result.stderr and "Traceback" not in result.stderr
        assert run(manager.get(vm)).state is InstanceState.RUNNING  # no side effect
    finally:
        run(manager.delete(fresh_name))



def test_exec_cut_off_by_a_standby_is_a_conflict(manager: InstanceManager, vm: str) -> None:
    """exec runs unlocked beside other operations: a standby that takes the VM away while
    a command runs is the conflict to report (409), not a guest agent failure (502), also
    in the moment the state is published and the killed QEMU has not exited yet."""
    marker = f"exec-started-{os.getpid()}"
    console = manager.console_path(vm)

    async def race() -> None:
        command = asyncio.create_task(manager.exec(
            vm, ["sh", "-c", f"echo {marker} > /dev/console; sleep 60"]))
        while marker.encode() not in console.read_bytes():  # the command runs in the guest
            await asyncio.sleep(0.02)
        await manager.standby(vm)
        with pytest.raises(WrongState, match="went standby during the command"):
            await command

    try:
        run(race())
    finally:
        run(manager.restore(vm))


def test_exec_beside_a_published_standby_whose_qemu_is_not_gone_is_a_conflict(
        manager: InstanceManager, data_root: Path, vm: str) -> None:
    """Between a standby publishing the state and its killed QEMU exiting, the QEMU still
    exists but answers nothing; an exec arriving then must be refused as the conflict
    it is (the VM is in standby: its state is published), not fail as a broken agent.
    The window is held open by stopping QEMU at the fault point and running `torpor exec`
    from there."""
    record = load_runtime(manager.paths(vm))
    assert record is not None
    out = Path(tempfile.mkdtemp()) / "exec.out"
    cli = f"{sys.executable} -m torpor.cli.main --local exec {vm} -- true"
    env = {faults.ENV: "standby.published=exec", faults.EXEC_ENV:
           f"kill -STOP {record.identity.pid}; {cli} > {out} 2>&1; echo rc=$? >> {out}"}
    try:
        result = torpor_cli(data_root, "--local", "standby", vm, env=env)
        assert result.returncode == 0, result.stderr
        said = out.read_text()
        assert "rc=4" in said and "is in standby, not running" in said, said
        assert "Traceback" not in said
    finally:
        run(manager.restore(vm))


def test_a_vm_reads_as_standby_from_its_published_state_until_a_restore_consumes_it(
        manager: InstanceManager, data_root: Path, vm: str) -> None:
    """While a QEMU exists beside a standby state (standby's, not yet gone; a restore's,
    started or loaded, the state not yet consumed) the guest has not run since the save,
    and recovery would make it standby: anyone asking reads standby, not paused. Asked
    with `torpor show` at the fault points, while the operation waits for it."""
    out = Path(tempfile.mkdtemp()) / "states"
    show = (f"{sys.executable} -m torpor.cli.main --local show {vm} --json | "
            f"{sys.executable} -c 'import json, sys; print(json.load(sys.stdin)[\"state\"])'"
            f" >> {out}")
    try:
        for operation, points in (("standby", "standby.published=exec"),
                                  ("restore", "restore.spawned=exec,restore.loaded=exec")):
            result = torpor_cli(data_root, "--local", operation, vm,
                                env={faults.ENV: points, faults.EXEC_ENV: show})
            assert result.returncode == 0, result.stderr
        assert out.read_text().split() == ["standby"] * 3
        assert run(manager.get(vm)).state is InstanceState.RUNNING
    finally:
        running(manager, vm)


def test_exec_whose_vm_is_stood_by_and_restored_while_it_waits_is_a_conflict(
        manager: InstanceManager, data_root: Path, vm: str) -> None:
    """What CI's soak test met: an exec waits for the agent (another client has it), and
    meanwhile other requests stand the VM by and restore it. The exec reports the
    conflict (409), not a broken agent (502). Ordered by events: the exec has opened the
    agent's port (its descriptor is in our table) before the command line, run while our
    event loop is blocked, stands the VM by and restores it."""
    pipe = manager.paths(vm).agent_pipe
    requests = str(pipe_fifos(pipe)[0])

    def opened_here() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/self/fd/{fd}") == requests
        return count

    async def race() -> None:
        async with GuestAgent.connect(pipe):  # another client has the agent
            command = asyncio.create_task(manager.exec(vm, ["touch", "/tmp/ran"]))
            while opened_here() < 2:  # the exec waits for the port
                await asyncio.sleep(0.01)
            for operation in ("standby", "restore"):  # (blocking: the exec runs after)
                result = torpor_cli(data_root, "--local", operation, vm)
                assert result.returncode == 0, result.stderr
            with pytest.raises(WrongState, match="stood by and restored"):
                await command

    run(race())
    assert sh(manager, vm, "test -e /tmp/ran && echo ran || echo not").strip() == "not"


@pytest.mark.parametrize("codec", [Codec.NONE, Codec.ZSTD])
def test_flipped_byte_is_refused_and_snapshot_kept(manager: InstanceManager, vm: str,
                                                   codec: Codec) -> None:
    before = fill_guest(manager, vm)
    run(manager.standby(vm, CompressionPolicy(codec=codec)))
    latest = manager.paths(vm).standby_dir
    state_file = latest / Manifest.load(latest).state.stored_name()
    size = state_file.stat().st_size
    with open(state_file, "r+b") as f:
        f.seek(size // 2)
        original = f.read(1)
        f.seek(size // 2)
        f.write(bytes([original[0] ^ 0x01]))
    with pytest.raises(IntegrityError, match=r"checksum|corrupt|read back"):
        run(manager.restore(vm))
    assert run(manager.get(vm)).state is InstanceState.STANDBY
    assert state_file.exists() and (latest / "manifest.json").exists()
    assert load_runtime(manager.paths(vm)) is None  # no QEMU left behind
    with open(state_file, "r+b") as f:  # repair it: the kept snapshot restores
        f.seek(size // 2)
        f.write(original)
    run(manager.restore(vm))
    assert guest_view(manager, vm)["ram"] == before["ram"]


def test_state_qemu_cannot_load_is_a_clear_error_and_snapshot_kept(
        manager: InstanceManager, vm: str) -> None:
    """A state whose checksum holds but that QEMU rejects (cut short, manifest made to
    match): QEMU, loading it from its command line, exits; its message is the error."""
    run(manager.standby(vm))
    latest = manager.paths(vm).standby_dir
    manifest = Manifest.load(latest)
    state_file = latest / manifest.state.stored_name()
    whole = state_file.read_bytes()
    state_file.write_bytes(whole[:len(whole) // 2])
    cut = checksum_file(state_file)
    manifest.model_copy(update={"state": manifest.state.model_copy(update={
        "checksum": cut.checksum, "stored_bytes": cut.stored_bytes})}).save(latest)
    # QEMU exits while torpor launches it ("could not load") or once it has reached its
    # monitor ("stopped while loading"), as the host schedules them: either way its own
    # message is the error.
    with pytest.raises(OperationFailed,
                       match=r"(could not load|stopped while loading) the machine state.*qemu"):
        run(manager.restore(vm))
    assert run(manager.get(vm)).state is InstanceState.STANDBY
    assert load_runtime(manager.paths(vm)) is None  # no QEMU left behind
    state_file.write_bytes(whole)  # put back: the kept snapshot restores
    manifest.save(latest)
    assert run(manager.restore(vm)).state is InstanceState.RUNNING


def qemus_of(manager: InstanceManager, name: str) -> list[int]:
    """Live processes started with this instance's monitor socket on their command line."""
    socket = str(manager.paths(name).qmp_socket).encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and socket in (entry / "cmdline").read_bytes():
                identity = ProcessIdentity.of(int(entry.name))
                if identity is not None and identity.is_alive():
                    found.append(identity.pid)
        except OSError:
            continue
    return found


def test_failure_while_qemu_loads_leaves_no_qemu(manager: InstanceManager, vm: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while QEMU is reading the state from its command line (injected where
    restore attaches to the agent): the QEMU being launched is killed, the snapshot kept."""
    run(manager.standby(vm))

    async def broken(*_: Any, **__: Any) -> None:
        raise OperationFailed("injected failure")

    monkeypatch.setattr(GuestAgent, "attach_early", broken)
    with pytest.raises(OperationFailed, match="injected failure"):
        run(manager.restore(vm))
    assert not qemus_of(manager, vm)  # the QEMU that was loading is gone
    assert load_runtime(manager.paths(vm)) is None
    assert run(manager.get(vm)).state is InstanceState.STANDBY
    monkeypatch.undo()
    assert run(manager.restore(vm)).state is InstanceState.RUNNING


def test_other_qemu_version_is_refused_and_snapshot_kept(manager: InstanceManager,
                                                          vm: str) -> None:
    run(manager.standby(vm))
    latest = manager.paths(vm).standby_dir
    manifest = Manifest.load(latest)
    real = manifest.qemu_version
    manifest.model_copy(update={"qemu_version": "1.0.0"}).save(latest)
    with pytest.raises(IntegrityError, match=r"written by QEMU 1\.0\.0"):
        run(manager.restore(vm))
    assert run(manager.get(vm)).state is InstanceState.STANDBY
    assert load_runtime(manager.paths(vm)) is None  # the QEMU that was asked is gone
    manifest.model_copy(update={"qemu_version": real}).save(latest)
    assert run(manager.restore(vm)).state is InstanceState.RUNNING


def test_left_out_zero_pages_load_into_the_same_memory(manager: InstanceManager, vm: str,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Guest RAM as saved (paused source) and as loaded (before `cont`), byte for byte,
    though the stream left most zero pages out: the receiving QEMU holds zeros there
    (even where a QEMU booting the guest would have put the kernel image)."""
    fill_guest(manager, vm)
    # Zero-filled pages all over the guest's free memory, the kernel image's freed
    # init sections included: left out, they must read back as zeros.
    sh(manager, vm, "free_kib=$(awk '/MemAvailable/ {print $2}' /proc/meminfo);"
       " dd if=/dev/zero of=/tmp/zeros bs=1M count=$((free_kib / 1024 * 3 / 4))"
       " 2>/dev/null; rm /tmp/zeros")
    ram_bytes = run(manager.get(vm)).memory_mib << 20

    async def dump(mon: Monitor, name: str) -> None:
        await mon.execute("pmemsave", {"val": 0, "size": ram_bytes,
                                       "filename": str(tmp_path / name)}, timeout=120)

    real_save, real_resume = standby_module.save_state, Monitor.resume

    async def dump_then_save(mon: Monitor, *args: Any, **kwargs: Any) -> Any:
        await dump(mon, "saved")  # the paused source
        return await real_save(mon, *args, **kwargs)

    async def dump_then_resume(mon: Monitor) -> None:
        await dump(mon, "loaded")  # loaded, before anything is sent to the guest
        await real_resume(mon)

    monkeypatch.setattr(standby_module, "save_state", dump_then_save)
    monkeypatch.setattr(Monitor, "resume", dump_then_resume)
    run(manager.standby(vm))
    left_out = Manifest.load(manager.paths(vm).standby_dir).state.zero_pages
    assert left_out is not None and left_out.block == "pc.ram"
    assert left_out.pages > (ram_bytes >> 12) // 4  # an idle-ish guest: mostly zeros
    run(manager.restore(vm))
    assert filecmp.cmp(tmp_path / "saved", tmp_path / "loaded", shallow=False)


def test_a_qemu_the_zero_page_filter_is_not_proven_on_saves_the_whole_stream(
        manager: InstanceManager, vm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The filter runs only on the QEMU versions its tests cover: on another the state is
    QEMU's stream as it came, zero pages and all, and restores as well."""
    marks = fill_guest(manager, vm)
    monkeypatch.setattr(zeropages, "PROVEN_ON", ("99.",))  # this QEMU is not among them
    run(manager.standby(vm))
    manifest = Manifest.load(manager.paths(vm).standby_dir)
    assert manifest.state.zero_pages is None
    run(manager.restore(vm))
    out = sh(manager, vm, "md5sum /tmp/ram.bin /root/disk.bin")
    assert marks["ram"] in out and marks["disk"] in out
    monkeypatch.undo()
    run(manager.standby(vm))  # and the proven QEMU filters again
    assert Manifest.load(manager.paths(vm).standby_dir).state.zero_pages is not None
    run(manager.restore(vm))


def test_qemu_killed_mid_save_leaves_crashed_vm_with_intact_disk(
        manager: InstanceManager, fresh_name: str) -> None:
    run(manager.create(fresh_name, memory_bytes=384 << 20))
    try:
        info = run(manager.start(fresh_name))
        sh(manager, fresh_name, "echo kept > /root/mark; sync;"
           " dd if=/dev/urandom of=/tmp/fill bs=1M count=200 2>/dev/null")
        killed = []

        class KillOnFirstBytes(ProgressObserver):
            """The save's first progress report kills QEMU: a crash mid-save."""

            def counter(self, stage: str, total: int | None = None) -> Progress:
                def kill_qemu(_: int) -> None:
                    if stage == "save" and not killed and info.pid:
                        os.kill(info.pid, signal.SIGKILL)
                        killed.append(True)
                return kill_qemu

        async def standby_killed() -> None:
            with observing(KillOnFirstBytes()):
                await manager.standby(fresh_name, CompressionPolicy())

        with pytest.raises(OperationFailed, match="QEMU died during the save"):
            run(standby_killed())
        assert killed
        paths = manager.paths(fresh_name)
        assert run(manager.get(fresh_name)).state is InstanceState.CRASHED
        assert not paths.standby_dir.exists() and not paths.standby_partial_dir.exists()
        run(manager.start(fresh_name))
        assert sh(manager, fresh_name, "cat /root/mark") == "kept\n"
    finally:
        run(manager.delete(fresh_name, force=True))


@pytest.fixture
def tiny_data_root() -> Iterator[Path]:
    """A small data root of its own: an ext4 filesystem on a loop device (ext4: no
    reflink, so snapshot and fork copies really need the space)."""
    mnt = Path(tempfile.mkdtemp(prefix="tp-full-", dir="/tmp"))
    image = mnt.with_suffix(".img")
    subprocess.run(["truncate", "-s", "1536M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["pkill", "-KILL", "-f", f"{mnt}/instances"], check=False)
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()
        image.unlink()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.parametrize("codec", [Codec.NONE, Codec.ZSTD])
def test_disk_full_fails_cleanly_and_gives_the_space_back(
        tiny_data_root: Path, guest_image: GuestImage, codec: Codec) -> None:
    """Standby (raw or compressed), a snapshot and a fork running out of space: each fails
    with the disk's own error, the VM keeps running with its data, nothing partial is
    left and the space is given back."""
    mgr = InstanceManager(tiny_data_root, Settings(accel="tcg"))
    run(mgr.create("full", disk_bytes=1 << 30))
    run(mgr.start("full"))
    before = fill_guest(mgr, "full", ram_mib=48)
    # Leave 8 MiB free: far less than the ~48 MiB of random guest RAM the save needs, and
    # than the disk a snapshot or fork copies.
    ballast = tiny_data_root / "ballast"
    subprocess.run(["fallocate", "-l", str(free_bytes(tiny_data_root) - (8 << 20)),
                    str(ballast)], check=True)
    free = free_bytes(tiny_data_root)
    assert free <= 9 << 20
    attempts = [("standby", lambda: mgr.standby("full", CompressionPolicy(codec=codec))),
                ("snapshot", lambda: mgr.snapshot_create("full", "s", compression=(
                    CompressionPolicy(codec=codec) if codec is not Codec.NONE else None))),
                ("fork", lambda: mgr.fork("full", "f"))]
    for what, attempt in attempts:
        with pytest.raises(OperationFailed) as info:
            run(attempt())
        assert "No space left on device" in str(info.value), (what, str(info.value))
        assert run(mgr.get("full")).state is InstanceState.RUNNING, what
        assert run(mgr.check()) == [], what  # no partial state, snapshot or fork copy
        assert mgr.snapshot_list() == [] and mgr.instance_names() == {"full"}, what
        assert free_bytes(tiny_data_root) >= free - (1 << 20), what  # the space is back
    view = guest_view(mgr, "full")
    assert (view["ram"], view["disk"]) == (before["ram"], before["disk"])
    assert int(view["counter"]) > int(before["counter"])  # the same processes, still going
    run(mgr.delete("full", force=True))
