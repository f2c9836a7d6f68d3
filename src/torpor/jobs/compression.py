"""Background compression of saved machine state: plans, workers, readers' preparation.

A job's subject is an instance's standby state or a stored snapshot's (its payload is
laid out like an instance, so the same files and manifest). After a standby or snapshot
whose policy says `background`, the raw state stays on disk and a plan (codec, level,
not-before time) goes into the instance's metadata or the snapshot's record. A detached
worker process (jobs/worker.py) carries it out, so the job never dies with the CLI that
asked for it. The worker holds jobs/<key>.lock while it lives and records its identity
in jobs/<key>.json; at most N workers compress at once (slot locks), at nice 19 and idle
I/O priority.

Every reader of the state (restore, delete, fork, snapshot; of a stored snapshot:
restore-into, fork, delete) stops the job first under the subject's lock
(`prepare_for_read`, `prepare_snapshot_for_read`): it cancels the worker and waits until
it has really exited, so no half-written file is renamed after the reader started; then a
raw file wins over any compressed sibling. A worker cancelled during its delay counts as
`skipped`, during its work as `preempted`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from torpor import faults
from torpor.codec import SUFFIXES, Codec, checksum_file, sparse_decompressor_argv
from torpor.codec.frames import compress_file
from torpor.errors import IntegrityError, OperationFailed, TorporError
from torpor.fsutil import atomic_write_json, fsync_dir, read_json
from torpor.hypervisor.process import ProcessIdentity, TrackedProcess
from torpor.instances.context import InstanceContext, Settings
from torpor.instances.info import CompressionState, CompressionStatus
from torpor.instances.metadata import CompressionPlan, CompressionPolicy, InstanceMetadata
from torpor.instances.snapshotrecord import load_record, save_record
from torpor.machinestate.manifest import MACHINE_STATE, FileIdentity, Manifest
from torpor.paths import DataRoot, InstancePaths

CANCEL_TIMEOUT = 30.0
CANCEL_POLL = 0.01
TMP_SUFFIX = ".tmp"
Clock = Callable[[], float]


@dataclass(frozen=True)
class Subject:
    """What a job compresses: an instance's standby state or a stored snapshot's."""

    kind: Literal["instance", "snapshot"]
    id: str

    @classmethod
    def instance(cls, instance_id: str) -> Subject:
        return cls("instance", instance_id)

    @classmethod
    def snapshot(cls, snapshot_id: str) -> Subject:
        return cls("snapshot", snapshot_id)

    @property
    def key(self) -> str:
        return f"{self.kind}-{self.id}"

    def paths(self, data_root: DataRoot) -> InstancePaths:
        """The state's directory layout (a snapshot's payload is laid out like an instance)."""
        if self.kind == "instance":
            return data_root.instance(self.id)
        return data_root.snapshot(self.id).payload_instance()

    def lock(self, data_root: DataRoot) -> Path:
        """Held by the subject's readers, and by the job while it publishes."""
        if self.kind == "instance":
            return data_root.instance_lock(self.id)
        return data_root.snapshot_lock(self.id)

    def load_plan(self, data_root: DataRoot) -> CompressionPlan | None:
        """Its plan (None also when the subject is gone)."""
        try:
            if self.kind == "instance":
                return InstanceMetadata.load(data_root.instance(self.id).metadata
                                             ).compression_plan
            return load_record(data_root.snapshot(self.id)).compression_plan
        except FileNotFoundError:
            return None

    def save_plan(self, data_root: DataRoot, plan: CompressionPlan | None) -> None:
        """Record `plan` (None: done); nothing if the subject is gone."""
        with contextlib.suppress(FileNotFoundError):
            if self.kind == "instance":
                paths = data_root.instance(self.id)
                meta = InstanceMetadata.load(paths.metadata)
                meta.compression_plan = plan
                meta.save(paths.metadata)
            else:
                snapshot = data_root.snapshot(self.id)
                record = load_record(snapshot)
                record.compression_plan = plan
                save_record(snapshot, record)


def instance_job_key(instance_id: str) -> str:
    return Subject.instance(instance_id).key


def make_plan(policy: CompressionPolicy, now: float) -> CompressionPlan:
    return CompressionPlan(codec=policy.codec, level=policy.effective_level(),
                           not_before=now + max(0.0, policy.delay_s),
                           store_incompressible=policy.store_incompressible)


def for_memory_file(policy: CompressionPolicy, idle_delay: float) -> CompressionPolicy:
    """Memory-file mode: what is worth compressing is the RAM file, and only a background
    job does that (the save stays milliseconds): a `sync` policy becomes a background one
    that waits `idle_delay` first; a background one keeps its own delay."""
    if policy.codec is Codec.NONE or policy.mode == "background":
        return policy
    return policy.model_copy(update={"mode": "background", "delay_s": idle_delay})


def compressed_after_window(policy: CompressionPolicy) -> bool:
    """`auto` in sync mode: saved raw inside the paused window and compressed right after
    it by the same operation (`compress_saved_state`), before it returns."""
    return policy.mode == "sync" and policy.store_incompressible and policy.codec is Codec.ZSTD


def remaining_delay(plan: CompressionPlan, now: float) -> float:
    """Seconds the job must still wait (0 once due): what a restarted manager re-queues."""
    return max(0.0, plan.not_before - now)


# --- workers ----------------------------------------------------------------------------

def worker_identity(data_root: DataRoot, key: str) -> ProcessIdentity | None:
    """The live worker for `key`, if any."""
    try:
        identity = ProcessIdentity.model_validate(read_json(data_root.job_worker(key)))
    except (FileNotFoundError, ValueError):
        return None
    return identity if identity.is_alive() else None


def launch_worker(data_root: DataRoot, subject: Subject, *, slots: int,
                  rate_limit: int | None) -> None:
    """Start a detached worker for the subject's plan, unless one runs. The job lock is
    taken here and handed to the worker (an inherited descriptor: the same lock), so the
    job counts as running from the moment this returns."""
    data_root.jobs_dir.mkdir(parents=True, exist_ok=True)
    key = subject.key
    lock_fd = os.open(data_root.job_lock(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a worker has this job
        argv = [sys.executable, "-m", "torpor.jobs.worker",
                "--data-root", str(data_root.root), f"--{subject.kind}", subject.id,
                "--slots", str(slots), "--lock-fd", str(lock_fd)]
        if rate_limit:
            argv += ["--rate-limit", str(rate_limit)]
        with open(data_root.job_log(key), "ab") as log:
            # Double fork through `setsid -f`: the worker is no child of ours to reap, and
            # it survives this process.
            subprocess.run(["setsid", "-f", *argv], stdin=subprocess.DEVNULL, stdout=log,
                           stderr=log, check=True, pass_fds=(lock_fd,))
    finally:
        os.close(lock_fd)  # the worker's copy keeps the lock


def cancel_and_wait(data_root: DataRoot, key: str, timeout: float = CANCEL_TIMEOUT) -> None:
    """Stop the job's worker and return only once it has exited and released its lock.

    Polls the job lock rather than blocking on it: a worker that has the lock but has not
    yet written its identity (just started) is signalled as soon as it has, so a reader
    holding the instance lock never waits on a worker that waits on that lock."""
    lock = data_root.job_lock(key)
    deadline = time.monotonic() + timeout
    signalled: ProcessIdentity | None = None
    while lock.exists() and not _lock_free(lock):
        identity = worker_identity(data_root, key)
        if identity is not None and identity != signalled:
            TrackedProcess(identity).signal(signal.SIGTERM)
            signalled = identity
        if time.monotonic() >= deadline:
            if identity is None:
                raise OperationFailed(f"a compression worker holds {lock} and does not say"
                                      " who it is; it did not exit within"
                                      f" {timeout:.0f} s")
            TrackedProcess(identity).kill()
            deadline = time.monotonic() + timeout  # killed: its lock goes with it
        time.sleep(CANCEL_POLL)


def _lock_free(lock: Path) -> bool:
    fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # releases the probe lock if we got it
    return True


def job_running(data_root: DataRoot, key: str) -> bool:
    """True while a worker holds the job lock."""
    lock = data_root.job_lock(key)
    try:
        return not _lock_free(lock)
    except FileNotFoundError:
        return False


def remove_job_files(data_root: DataRoot, key: str) -> None:
    """A deleted instance's job files (its worker has exited: cancel_and_wait first)."""
    for path in (data_root.job_lock(key), data_root.job_worker(key), data_root.job_log(key)):
        path.unlink(missing_ok=True)


# --- files ------------------------------------------------------------------------------

def compression_target(paths: InstancePaths) -> Path:
    """The raw file a standby's background job compresses: the RAM file in memory-file
    mode (its device state is tiny), else the machine state. IntegrityError if the
    manifest cannot be read (a job must not guess which file is which)."""
    kind = Manifest.load(paths.standby_dir).kind
    return paths.memory_file if kind == "memory-file" else paths.standby_dir / MACHINE_STATE


def siblings(raw: Path) -> tuple[dict[Codec, Path], list[Path]]:
    """(existing compressed versions of `raw`, leftover .tmp files of killed jobs)."""
    compressed = {codec: raw.with_name(raw.name + suffix) for codec, suffix in SUFFIXES.items()
                  if raw.with_name(raw.name + suffix).exists()}
    stale = list(raw.parent.glob(raw.name + "*" + TMP_SUFFIX))
    return compressed, stale


def tidy(raw: Path, named: Codec) -> None:
    """No worker runs: drop .tmp leftovers and every version of `raw` but the one the
    manifest names. The manifest is rewritten only once the file it names is complete, so
    whichever step a killed job or reader stopped at, the named file is whole and any
    other is a leftover (a raw file wins over a partial, .tmp, compressed one)."""
    compressed, stale = siblings(raw)
    for path in stale:
        path.unlink(missing_ok=True)
    keep = raw.with_name(raw.name + SUFFIXES.get(named, ""))
    if not keep.exists():
        return  # nothing to prefer: the reader's checks name what is missing
    for path in (raw, *compressed.values()):
        if path != keep:
            path.unlink(missing_ok=True)


def tidy_standby(paths: InstancePaths) -> None:
    """tidy() the standby state's files (and the RAM file in memory-file mode) by what its
    manifest names; an unreadable manifest leaves everything for the reader to refuse."""
    try:
        manifest = Manifest.load(paths.standby_dir)
    except TorporError:
        return
    tidy(paths.standby_dir / manifest.state.name, manifest.state.codec)
    if manifest.memory_file is not None:
        tidy(paths.memory_file, manifest.memory_file.codec)


def publish_compressed(directory: Path, manifest: Manifest, raw: Path, tmp: Path,
                       final: Path) -> None:
    """A complete (flushed) compressed file `tmp` put in place of `raw`: renamed to `final`,
    then the manifest (already describing it) written, then the raw file removed. A kill
    between any two steps leaves the manifest naming a whole file (`tidy`)."""
    os.replace(tmp, final)
    fsync_dir(final.parent)
    faults.point("compress.renamed")
    manifest.save(directory)
    faults.point("compress.recorded")
    raw.unlink()
    fsync_dir(raw.parent)


def compress_saved_state(directory: Path, manifest: Manifest, level: int, *, threads: int,
                         stop: threading.Event) -> Manifest:
    """`auto` in sync mode, right after the paused window: the raw state file in
    `directory` (described by `manifest`) rewritten as zstd frames, the chunks that do not
    compress stored raw. Compressing inside the window cost a small guest's pause ~130 ms
    of CPU per ~70 MB of compressible memory on 2 cores (docs/design.md); here it costs
    the operation's time, not the guest's. Returns the manifest as published."""
    raw = directory / manifest.state.name
    final = raw.with_name(raw.name + SUFFIXES[Codec.ZSTD])
    tmp = final.with_name(final.name + TMP_SUFFIX)

    def stopped(_read: int) -> None:
        if stop.is_set():
            raise OperationFailed("compression of the saved state was cancelled")

    try:
        with open(raw, "rb") as src, open(tmp, "wb") as out:
            frames = compress_file(src.fileno(), out.fileno(), level, threads=threads,
                                   store_incompressible=True, each_chunk=stopped)
            os.fsync(out.fileno())
        checksum = checksum_file(tmp).checksum
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    compressed = manifest.model_copy(update={"state": manifest.state.as_frames(
        level, frames, checksum)})
    publish_compressed(directory, compressed, raw, tmp, final)
    return compressed


def decompress_memory_file(paths: InstancePaths) -> None:
    """Memory-file mode: QEMU maps the RAM file, so a compressed one is decompressed
    first, keeping its holes (zero runs become holes again, not written zeros). Order:
    raw file complete → manifest names it → compressed file removed; a kill between any
    two leaves the manifest naming a whole file."""
    manifest = Manifest.load(paths.standby_dir)
    memory = manifest.memory_file
    if memory is None or memory.codec is Codec.NONE:
        return
    raw = paths.memory_file
    source = raw.with_name(raw.name + SUFFIXES[memory.codec])
    tmp = raw.with_name(raw.name + TMP_SUFFIX)
    result = subprocess.run([*sparse_decompressor_argv(memory.codec, source, tmp)],
                            capture_output=True, check=False)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise IntegrityError(f"{memory.codec} could not decompress {source}: "
                             f"{result.stderr.decode(errors='replace').strip()}")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, raw)
    fsync_dir(raw.parent)
    manifest.memory_file = memory.model_copy(update={"codec": Codec.NONE, "stored_bytes": None})
    manifest.memory_file.identity = FileIdentity.of(raw)  # a new file, same content
    manifest.save(paths.standby_dir)
    source.unlink()
    fsync_dir(raw.parent)


def prepare_for_read(ctx: InstanceContext) -> CompressionPlan | None:
    """What every reader of the standby state does first (holding the instance lock):
    stop the job, keep only the files the manifest names, decompress a RAM file. Returns
    the plan it took over: a reader that leaves the state in place (a snapshot or fork of
    a standby source) hands it back with `resume_plan` afterwards."""
    cancel_and_wait(ctx.data_root, instance_job_key(ctx.meta.id))
    if ctx.paths.standby_dir.exists():
        tidy_standby(ctx.paths)
        decompress_memory_file(ctx.paths)
    plan = ctx.meta.compression_plan
    if plan is not None:
        ctx.meta.compression_plan = None
        ctx.meta.save(ctx.paths.metadata)
    return plan


def resume_plan(ctx: InstanceContext, plan: CompressionPlan | None, *, slots: int,
                rate_limit: int | None) -> None:
    """Give a standby state's compression plan back after a reader that did not consume
    the state: the job is queued again (with what remains of its delay)."""
    if plan is None or plan.error or not ctx.paths.standby_dir.exists():
        return
    ctx.meta.compression_plan = plan
    ctx.meta.save(ctx.paths.metadata)
    launch_worker(ctx.data_root, Subject.instance(ctx.meta.id), slots=slots,
                  rate_limit=rate_limit)


def prepare_snapshot_for_read(data_root: DataRoot, snapshot_id: str
                              ) -> CompressionPlan | None:
    """`prepare_for_read` for a stored snapshot's state (the caller holds the snapshot's
    lock): its job stopped, only the files its manifest names kept, a RAM file
    decompressed (forks map it). Returns the plan it took over (`resume_snapshot_plan`)."""
    subject = Subject.snapshot(snapshot_id)
    cancel_and_wait(data_root, subject.key)
    paths = subject.paths(data_root)
    if paths.standby_dir.exists():
        tidy_standby(paths)
        decompress_memory_file(paths)
    plan = subject.load_plan(data_root)
    if plan is not None:
        subject.save_plan(data_root, None)
    return plan


def resume_snapshot_plan(data_root: DataRoot, snapshot_id: str, plan: CompressionPlan | None,
                         *, mapped: bool, slots: int, rate_limit: int | None) -> None:
    """Give a stored snapshot its plan back after a reader. Not when instances now map its
    RAM file (`mapped`: memory-file forks): compressing it would take the file they map."""
    paths = Subject.snapshot(snapshot_id).paths(data_root)
    if plan is None or plan.error or not paths.standby_dir.exists():
        return
    if mapped and compression_target(paths) == paths.memory_file:
        return
    Subject.snapshot(snapshot_id).save_plan(data_root, plan)
    launch_worker(data_root, Subject.snapshot(snapshot_id), slots=slots, rate_limit=rate_limit)


def stored_state(manifest: Manifest) -> tuple[Codec, int]:
    """What a snapshot's record reports as stored: the codec of what shrinks (the RAM file
    in memory-file mode, else the state) and the state's stored size."""
    codec = manifest.state.codec
    if manifest.memory_file is not None and manifest.memory_file.codec is not Codec.NONE:
        codec = manifest.memory_file.codec
    return codec, manifest.state.stored_bytes


def record_snapshot_state(data_root: DataRoot, snapshot_id: str) -> None:
    """After a job published a snapshot's compressed state: its record says what is
    stored now, as its manifest does."""
    snapshot = data_root.snapshot(snapshot_id)
    manifest = Manifest.load(snapshot.payload_instance().standby_dir)
    record = load_record(snapshot)
    record.state_codec, record.state_bytes = stored_state(manifest)
    save_record(snapshot, record)


def snapshot_stored_state(data_root: DataRoot, snapshot_id: str) -> tuple[Codec, int] | None:
    """The manifest's word on what is stored: a job publishes the manifest before it
    updates the record, so a reader between the two takes it from here."""
    try:
        manifest = Manifest.load(data_root.snapshot(snapshot_id).payload_instance().standby_dir)
    except Exception:
        return None
    return stored_state(manifest)


def clear_stale_plan(data_root: DataRoot, subject: Subject) -> None:
    """Drop a plan that no longer applies, if the subject is not busy right now."""
    fd = os.open(subject.lock(data_root), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # an operation (a reader) holds it; it prepares the state itself
        subject.save_plan(data_root, None)
    finally:
        os.close(fd)


def status(data_root: DataRoot, subject: Subject,
           plan: CompressionPlan | None) -> CompressionStatus:
    """Where the subject's compression stands (as `show` and `snapshot list` report it)."""
    paths = subject.paths(data_root)
    try:
        manifest = Manifest.load(paths.standby_dir)
    except Exception:
        return CompressionStatus(state=CompressionState.NONE)
    state = manifest.state
    if manifest.memory_file is not None:  # memory-file mode: the RAM file is what shrinks
        memory = manifest.memory_file
        state = state.model_copy(update={"raw_bytes": memory.allocated_bytes,
                                         "codec": memory.codec,
                                         "stored_bytes": memory.stored_bytes or 0})
    if plan is not None and plan.error:
        return CompressionStatus(state=CompressionState.ERROR, algorithm=str(plan.codec),
                                 raw_bytes=state.raw_bytes, error=plan.error)
    if plan is not None:
        running = job_running(data_root, subject.key)
        return CompressionStatus(
            state=CompressionState.COMPRESSING if running and time.time() >= plan.not_before
            else CompressionState.PENDING,
            algorithm=str(plan.codec), raw_bytes=state.raw_bytes,
            not_before=plan.not_before)
    if state.codec is not Codec.NONE:
        return CompressionStatus(state=CompressionState.COMPRESSED, algorithm=str(state.codec),
                                 raw_bytes=state.raw_bytes, compressed_bytes=state.stored_bytes)
    return CompressionStatus(state=CompressionState.NONE, raw_bytes=state.raw_bytes)


# --- statistics (for metrics) -------------------------------------------------------------

class JobStats(BaseModel):
    completed: int = 0
    failed: int = 0
    preempted: int = 0
    skipped: int = 0
    bytes_saved: int = 0
    seconds_total: float = 0.0


def record_outcome(data_root: DataRoot, outcome: str, *, seconds: float = 0.0,
                   bytes_saved: int = 0) -> None:
    path = data_root.job_stats
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            stats = JobStats.model_validate(read_json(path))
        except (FileNotFoundError, ValueError):
            stats = JobStats()
        setattr(stats, outcome, getattr(stats, outcome) + 1)
        stats.bytes_saved += bytes_saved
        stats.seconds_total += seconds
        atomic_write_json(path, stats.model_dump())


def load_stats(data_root: DataRoot) -> JobStats:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return JobStats.model_validate(read_json(data_root.job_stats))
    return JobStats()


def requeue(data_root: DataRoot, subject: Subject, plan: CompressionPlan | None,
            settings: Settings) -> str | None:
    """Queue a plan again if its worker is gone (a restart, a killed worker); clear a plan
    whose state is gone (an instance that left standby). What it did, or None."""
    if plan is None or plan.error or job_running(data_root, subject.key):
        return None
    if (subject.paths(data_root).standby_dir / "manifest.json").exists():
        # The worker itself decides whether there is anything left to compress.
        launch_worker(data_root, subject, slots=settings.compression_jobs,
                      rate_limit=settings.compression_rate_limit)
        return "re-queued"
    clear_stale_plan(data_root, subject)
    return "plan cleared"
