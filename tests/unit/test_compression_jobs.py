"""The background job's logic on real files and the real zstd/lz4 tools, without QEMU;
the delay is driven by an injected clock."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from torpor.codec import Codec, checksum_file
from torpor.hypervisor.vmconfig import VMConfig
from torpor.instances.metadata import CompressionPlan, CompressionPolicy, ImageRef, InstanceMetadata
from torpor.jobs.compression import (
    CompressionState,
    Subject,
    load_stats,
    make_plan,
    remaining_delay,
    status,
)
from torpor.jobs.worker import Job
from torpor.machinestate.manifest import Manifest, StateFile
from torpor.paths import DataRoot

NOW = 1_800_000_000.0


def test_plan_and_remaining_delay() -> None:
    plan = make_plan(CompressionPolicy(codec=Codec.ZSTD, mode="background", delay_s=30), NOW)
    assert plan.level == 1 and plan.not_before == NOW + 30
    assert remaining_delay(plan, NOW) == 30
    assert remaining_delay(plan, NOW + 12.5) == 17.5
    assert remaining_delay(plan, NOW + 31) == 0  # overdue after a restart: run at once


def standby_instance(tmp_path: Path, codec: Codec, delay: float) -> tuple[DataRoot, str, bytes]:
    """An instance directory in standby with a raw state and a plan, as standby leaves it."""
    root = DataRoot(tmp_path / "data")
    root.ensure()
    paths = root.instance("abc123abc123")
    paths.standby_dir.mkdir(parents=True)
    raw = os.urandom(1 << 20) + bytes(3 << 20)  # compressible, like an idle guest's RAM
    (paths.standby_dir / "machine-state").write_bytes(raw)
    config = VMConfig(name="t", cpus=1, memory_mib=64, kernel=Path("/k"), mac="52:54:00:00:00:01",
                      qmp_socket=Path("/q"), agent_socket=Path("/a"), serial_log=Path("/s"))
    Manifest(created_at="2026-01-01T00:00:00Z", qemu_version="7.2.0", vm_config=config,
             guest_visible=config.guest_visible(),
             state=StateFile(raw_bytes=len(raw), stored_bytes=len(raw),
                             checksum=checksum_file(paths.standby_dir / "machine-state")
                             .checksum)).save(paths.standby_dir)
    InstanceMetadata(id="abc123abc123", name="t", created_at="2026-01-01T00:00:00Z", cpus=1,
                     memory_mib=64, disk_bytes=1, mac="52:54:00:00:00:01",
                     image=ImageRef(name="x", kernel=Path("/k"), initrd=None, cmdline=""),
                     compression_plan=CompressionPlan(codec=codec, level=1 if codec is Codec.ZSTD
                                                      else 0, not_before=NOW + delay)
                     ).save(paths.metadata)
    return root, "abc123abc123", raw


@pytest.mark.parametrize(("codec", "suffix", "tool"), [(Codec.ZSTD, ".zst", "zstd"),
                                                       (Codec.LZ4, ".lz4", "lz4")])
def test_due_job_compresses_and_publishes(tmp_path: Path, codec: Codec, suffix: str,
                                          tool: str) -> None:
    root, iid, raw = standby_instance(tmp_path, codec, delay=30)
    paths = root.instance(iid)
    job = Job(root, Subject.instance(iid), slots=1, rate_limit=None,
              clock=lambda: NOW + 31)  # delay elapsed
    assert asyncio.run(job.run()) == "completed"
    d = paths.standby_dir
    assert not (d / "machine-state").exists() and (d / f"machine-state{suffix}").exists()
    assert not list(d.glob("*.tmp"))
    state = Manifest.load(d).state
    assert state.codec is codec and state.raw_bytes == len(raw)
    assert state.checksum == checksum_file(d / f"machine-state{suffix}").checksum
    assert state.stored_bytes < len(raw) / 2
    import subprocess
    assert subprocess.run([tool, "-dc", str(d / f"machine-state{suffix}")],
                          capture_output=True, check=True).stdout == raw
    meta = InstanceMetadata.load(paths.metadata)
    assert meta.compression_plan is None
    assert status(root, Subject.instance(iid), None).state is CompressionState.COMPRESSED
    stats = load_stats(root)
    assert stats.completed == 1 and stats.bytes_saved == len(raw) - state.stored_bytes


def test_job_waits_out_its_delay_and_cancel_means_skipped(tmp_path: Path) -> None:
    root, iid, raw = standby_instance(tmp_path, Codec.ZSTD, delay=30)
    paths = root.instance(iid)
    plan = InstanceMetadata.load(paths.metadata).compression_plan
    assert plan is not None
    assert status(root, Subject.instance(iid), plan).state is CompressionState.PENDING
    async def scenario() -> tuple[str, str]:
        waiting = asyncio.Event()

        class Observed(Job):
            async def sleep(self, seconds: float) -> None:
                assert seconds == 20  # what the injected clock leaves of the delay
                waiting.set()
                await super().sleep(seconds)

        job = Observed(root, Subject.instance(iid), slots=1, rate_limit=None,
                       clock=lambda: NOW + 10)
        first = asyncio.create_task(job.run())
        await waiting.wait()  # inside its delay
        job.cancel.set()
        outcome = await first
        return outcome, (paths.standby_dir / "machine-state").read_bytes() == raw and "raw kept"

    outcome, kept = asyncio.run(scenario())
    assert outcome == "skipped" and kept == "raw kept"
    assert not list(paths.standby_dir.glob("machine-state.*"))  # nothing compressed
    assert load_stats(root).skipped == 1 and load_stats(root).preempted == 0


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.LZ4])  # frames, and the lz4 tool
def test_cancel_during_compression_is_preempted_and_leaves_no_tmp(tmp_path: Path,
                                                                  codec: Codec) -> None:
    root, iid, _ = standby_instance(tmp_path, codec, delay=0)
    paths = root.instance(iid)

    async def scenario() -> str:
        compressing = asyncio.Event()
        loop = asyncio.get_running_loop()

        class Observed(Job):
            async def _feed(self, proc: asyncio.subprocess.Process, src: object) -> object:
                compressing.set()  # the compressor runs, writing the .tmp
                return await super()._feed(proc, src)

            def chunk_read(self, sent: int) -> None:  # the frames thread is at work
                loop.call_soon_threadsafe(compressing.set)

        job = Observed(root, Subject.instance(iid), slots=1, rate_limit=256 << 10,
                       clock=lambda: NOW)  # ~16 s
        task = asyncio.create_task(job.run())
        await compressing.wait()
        assert list(paths.standby_dir.glob("*.tmp"))
        job.cancel.set()
        return await task

    assert asyncio.run(scenario()) == "preempted"
    assert not list(paths.standby_dir.glob("*.tmp"))
    assert (paths.standby_dir / "machine-state").exists()
    assert load_stats(root).preempted == 1
