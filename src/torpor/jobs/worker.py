"""The background compression worker: one detached process per job.

    python -m torpor.jobs.worker --data-root R (--instance ID | --snapshot ID)
                                 [--slots N] [--rate-limit BYTES_PER_S]

Steps: wait out the plan's delay; take one of N slots; compress the raw state into
`<raw>.<ext>.tmp` (fsync); then, under the subject's lock (the instance's, or the stored
snapshot's), rename it to `<raw>.<ext>`, record the codec, sizes and checksum in the
manifest, remove the raw file and clear the plan (in the instance's metadata or the
snapshot's record). SIGTERM cancels at any step (the .tmp is removed): during the delay or
slot wait the job counts as skipped, after that as preempted. Waiting for the lock is
itself cancellable, so a reader that holds the lock and cancels the worker never
deadlocks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from torpor import faults
from torpor.codec import SUFFIXES, Codec, checksum_file, compressor_argv
from torpor.codec.frames import FrameStats, compress_file
from torpor.errors import TorporError
from torpor.fsutil import atomic_write_json
from torpor.hypervisor.process import ProcessIdentity
from torpor.instances.metadata import CompressionPlan
from torpor.jobs.compression import (
    TMP_SUFFIX,
    Subject,
    compression_target,
    publish_compressed,
    record_outcome,
    record_snapshot_state,
    remaining_delay,
)
from torpor.machinestate.manifest import Manifest
from torpor.paths import DataRoot
from torpor.tasks import in_thread

log = logging.getLogger("torpor.compression")
POLL = 0.02
CHUNK = 1 << 20


class Cancelled(Exception):
    pass


class Job:
    def __init__(self, data_root: DataRoot, subject: Subject, slots: int,
                 rate_limit: int | None, clock: Callable[[], float] = time.time) -> None:
        self.data_root = data_root
        self.subject = subject
        self.paths = subject.paths(data_root)
        self.slots = max(1, slots)
        self.rate_limit = rate_limit
        self.cancel = asyncio.Event()
        self.clock = clock  # wall clock: plans store epoch times; injectable for tests

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # not wait_for: see hypervisor/qmp.py
                await self.cancel.wait()
        self.check()

    @contextlib.asynccontextmanager
    async def flock_any(self, paths: list[Path]) -> AsyncIterator[None]:
        """Hold the first of `paths` that is free; wait (cancellably) while none is."""
        while True:
            for path in paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    yield
                finally:
                    os.close(fd)
                return
            await self.sleep(POLL * 10)

    async def compress_frames(self, raw: Path, tmp: Path, plan: CompressionPlan) -> FrameStats:
        """A state file into zstd frames (codec/frames.py: a restore feeds those without a
        decompressor process), on one thread, at no more than rate_limit bytes/s."""

        def work(stop: threading.Event) -> FrameStats:
            start = time.monotonic()

            def paced(read: int) -> None:
                if stop.is_set():
                    raise Cancelled()
                self.chunk_read(read)
                if self.rate_limit:
                    stop.wait(read / self.rate_limit - (time.monotonic() - start))

            with open(raw, "rb") as src, open(tmp, "wb") as out:
                stats = compress_file(src.fileno(), out.fileno(), plan.level, threads=1,
                                      store_incompressible=plan.store_incompressible,
                                      each_chunk=paced)
                os.fsync(out.fileno())
            return stats

        stop = threading.Event()
        working = asyncio.ensure_future(in_thread(work, stop=stop))
        cancelled = asyncio.create_task(self.cancel.wait())
        try:
            await asyncio.wait({working, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            stop.set()  # cancelled, or finished anyway
            stats = await working
        finally:
            cancelled.cancel()
        self.check()
        return stats

    def chunk_read(self, sent: int) -> None:
        """From the compressing thread, after each chunk: nothing (a test observes a job
        mid-compression here)."""

    async def compress(self, raw: Path, tmp: Path, plan: CompressionPlan) -> None:
        argv = compressor_argv(plan.codec, plan.level)
        with open(raw, "rb") as src, open(tmp, "wb") as out:  # noqa: ASYNC230 - instant
            waiter: asyncio.Task[object]
            if self.rate_limit is None:
                proc = await asyncio.create_subprocess_exec(*argv, stdin=src, stdout=out)
                waiter = asyncio.create_task(proc.wait())
            else:
                proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.PIPE,
                                                            stdout=out)
                waiter = asyncio.create_task(self._feed(proc, src))
            cancelled = asyncio.create_task(self.cancel.wait())
            try:
                await asyncio.wait({waiter, cancelled}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                await asyncio.gather(waiter, return_exceptions=True)
                await proc.wait()  # always reaped
            finally:
                cancelled.cancel()
            self.check()
            if proc.returncode != 0:
                raise RuntimeError(f"{argv[0]} exited with status {proc.returncode}")
            out.flush()
            os.fsync(out.fileno())

    async def _feed(self, proc: asyncio.subprocess.Process, src: object) -> object:
        """Feed the compressor at no more than rate_limit bytes/s."""
        assert proc.stdin is not None and self.rate_limit
        start, sent = time.monotonic(), 0
        while chunk := src.read(CHUNK):  # type: ignore[attr-defined]
            proc.stdin.write(chunk)
            await proc.stdin.drain()
            sent += len(chunk)
            ahead = sent / self.rate_limit - (time.monotonic() - start)
            if ahead > 0:
                await asyncio.sleep(ahead)
        proc.stdin.close()
        return await proc.wait()

    @contextlib.asynccontextmanager
    async def subject_lock(self) -> AsyncIterator[None]:
        """The instance's (or snapshot's) lock: no reader is at work while it is held."""
        async with self.flock_any([self.subject.lock(self.data_root)]):
            yield

    def load_plan(self) -> CompressionPlan | None:
        return self.subject.load_plan(self.data_root)

    async def clear_plan(self, error: str | None = None) -> None:
        async with self.subject_lock():
            plan = self.load_plan()
            if plan is None:
                return
            self.subject.save_plan(self.data_root, plan.model_copy(update={"error": error})
                                   if error else None)

    async def run(self) -> str:
        plan = self.load_plan()
        if plan is None or plan.error:
            return "nothing to do"
        directory = self.paths.standby_dir
        if not (directory / "manifest.json").exists():
            await self.clear_plan()
            return "plan cleared: no standby state"
        try:
            raw = compression_target(self.paths)
        except TorporError as exc:  # never guess which file to compress
            record_outcome(self.data_root, "failed")
            await self.clear_plan(error=str(exc))
            return f"failed: {exc}"
        if not raw.exists():
            await self.clear_plan()
            return "plan cleared: no raw standby state"
        final = raw.with_name(raw.name + SUFFIXES[plan.codec])
        tmp = final.with_name(final.name + TMP_SUFFIX)
        started = None
        try:
            await self.sleep(remaining_delay(plan, self.clock()))
            slots = [self.data_root.compression_slot(i) for i in range(self.slots)]
            async with self.flock_any(slots):
                self.check()
                started = time.monotonic()
                tmp.unlink(missing_ok=True)  # a killed worker's leftover goes first
                frames = None
                if plan.codec is Codec.ZSTD and raw != self.paths.memory_file:
                    frames = await self.compress_frames(raw, tmp, plan)
                else:  # lz4; a RAM file is decompressed to a file before a restore
                    await self.compress(raw, tmp, plan)
                faults.point("compress.written")
                # The manifest records a checksum of a compressed state file only;
                # a compressed RAM file is checked by the codec's own frame checksum.
                checksum = (None if raw == self.paths.memory_file
                            else checksum_file(tmp).checksum)
            async with self.subject_lock():
                self.check()
                saved = self.commit(plan, raw, tmp, final, checksum, frames)
        except Cancelled:
            tmp.unlink(missing_ok=True)
            outcome = "skipped" if started is None else "preempted"
            record_outcome(self.data_root, outcome)
            return outcome
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            record_outcome(self.data_root, "failed")
            await self.clear_plan(error=f"{type(exc).__name__}: {exc}")
            raise
        record_outcome(self.data_root, "completed", seconds=time.monotonic() - started,
                       bytes_saved=saved)
        return "completed"

    def commit(self, plan: CompressionPlan, raw: Path, tmp: Path, final: Path,
               checksum: str | None, frames: FrameStats | None = None) -> int:
        """Under the subject's lock: publish the compressed file, then the manifest naming
        it, then drop the raw one. Readers keep the file the manifest names, so a kill
        between any two steps leaves a whole, named file (compression_jobs.tidy)."""
        if self.load_plan() is None or not raw.exists():
            tmp.unlink(missing_ok=True)  # a reader took over: nothing to publish
            raise Cancelled()
        manifest = Manifest.load(self.paths.standby_dir)
        stored = tmp.stat().st_size
        if manifest.memory_file is not None and raw == self.paths.memory_file:
            raw_bytes = raw.stat().st_blocks * 512  # what the sparse RAM file really held
            manifest.memory_file = manifest.memory_file.model_copy(update={
                "codec": plan.codec, "level": plan.level, "stored_bytes": stored})
        elif frames is not None:
            raw_bytes = raw.stat().st_size
            manifest.state = manifest.state.as_frames(plan.level, frames, checksum)
        else:
            raw_bytes = raw.stat().st_size
            manifest.state = manifest.state.model_copy(update={
                "codec": plan.codec, "level": plan.level, "raw_bytes": raw_bytes,
                "stored_bytes": stored, "checksum": checksum})
        publish_compressed(self.paths.standby_dir, manifest, raw, tmp, final)
        self.subject.save_plan(self.data_root, None)
        if self.subject.kind == "snapshot":
            record_snapshot_state(self.data_root, self.subject.id)
        return raw_bytes - final.stat().st_size


def lower_priority() -> None:
    os.nice(19)
    with contextlib.suppress(OSError):  # idle I/O class; children inherit both
        subprocess.run(["ionice", "-c", "3", "-p", str(os.getpid())], check=False,
                       capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="torpor background compression worker")
    parser.add_argument("--data-root", required=True, type=Path)
    whose = parser.add_mutually_exclusive_group(required=True)
    whose.add_argument("--instance", help="compress this instance's standby state")
    whose.add_argument("--snapshot", help="compress this stored snapshot's state")
    parser.add_argument("--slots", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rate-limit", type=int, default=None)
    parser.add_argument("--lock-fd", type=int, default=None,
                        help="the job lock, already held (inherited from the launcher)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data_root = DataRoot(args.data_root)
    subject = (Subject.instance(args.instance) if args.instance
               else Subject.snapshot(args.snapshot))
    key = subject.key
    data_root.jobs_dir.mkdir(parents=True, exist_ok=True)
    if args.lock_fd is not None:  # taken for us by the launcher (compression_jobs)
        lock_fd = args.lock_fd
        os.set_inheritable(lock_fd, False)  # the compressor must not hold the job
    else:
        lock_fd = os.open(data_root.job_lock(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                          0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another worker has this job
    # A cancel that comes before the event loop runs still counts as a cancel.
    cancelled_early = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancelled_early.set())
    # Who holds the job lock is said at once: a reader cancelling the job signals us by it.
    identity = ProcessIdentity.of(os.getpid())
    assert identity is not None
    atomic_write_json(data_root.job_worker(key), identity.model_dump())
    lower_priority()
    job = Job(data_root, subject, args.slots, args.rate_limit)

    async def run() -> str:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, job.cancel.set)
        if cancelled_early.is_set():
            job.cancel.set()
        return await job.run()

    try:
        outcome = asyncio.run(run())
        log.info("%s %s: %s", subject.kind, subject.id, outcome)
        return 0
    finally:
        data_root.job_worker(key).unlink(missing_ok=True)
        os.close(lock_fd)


if __name__ == "__main__":
    sys.exit(main())
