"""Parallel, bounded transfers of files as chunks: up (only the chunks the bucket does
not have) and down (every chunk checked against its hash, written in place, holes left
holes). Each runs its workers in a pool it waits for, on every path."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from torpor import faults
from torpor.errors import IntegrityError, OperationFailed
from torpor.remote import chunks
from torpor.remote.location import Location
from torpor.remote.manifest import ChunkRef, RemoteFile
from torpor.remote.store import NoSuchObject, ObjectStore, Truncated

WORKERS = 8  # requests in flight: the server, not the client, was the limit beyond this
LIST_PAGES = 20  # a listing of up to 20,000 chunks replaces one HEAD a chunk
Progress = Callable[[int], None]


@dataclass(frozen=True)
class LocalFile:
    """A file to push: where it is, its name in the snapshot, how it is cut."""

    source: Path
    path: str
    cutting: chunks.Cutting


@dataclass
class UploadStats:
    total_bytes: int = 0  # the data bytes of every chunk of every file (holes excluded)
    uploaded_bytes: int = 0  # what went over the wire (compressed chunks)
    chunks: int = 0
    skipped_chunks: int = 0  # the bucket had them already (or this push did)
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def sent(self, nbytes: int) -> None:
        with self._lock:
            self.uploaded_bytes += nbytes

    def skipped(self) -> None:
        with self._lock:
            self.skipped_chunks += 1

    def as_dict(self) -> dict[str, float | int]:
        return {"uploaded_bytes": self.uploaded_bytes, "total_bytes": self.total_bytes,
                "chunks": self.chunks, "skipped_chunks": self.skipped_chunks,
                "seconds": round(self.seconds, 3)}


class TransferStopped(OperationFailed):
    """The transfer was asked to stop (its caller was cancelled)."""


class _Bounded:
    """A pool whose callers block while `limit` tasks are in flight (memory stays bounded:
    each holds a chunk), and which stops taking work after the first failure, or when
    `stop` is set."""

    def __init__(self, pool: ThreadPoolExecutor, limit: int, stop: threading.Event | None
                 ) -> None:
        self.pool, self.slots = pool, threading.Semaphore(limit)
        self.futures: list[Future[None]] = []
        self.failed = threading.Event()
        self.stop = stop

    def submit(self, task: Callable[[], None]) -> None:
        self.slots.acquire()
        if self.failed.is_set() or (self.stop is not None and self.stop.is_set()):
            self.slots.release()
            self.raise_first()
            raise TransferStopped("the transfer was stopped")

        def run() -> None:
            try:
                task()
            except BaseException:
                self.failed.set()
                raise
            finally:
                self.slots.release()

        self.futures.append(self.pool.submit(run))

    def finish(self) -> None:
        wait(self.futures, return_when=FIRST_EXCEPTION)
        self.raise_first()
        wait(self.futures)

    def raise_first(self) -> None:
        for future in self.futures:
            if future.done() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]


def upload(store: ObjectStore, location: Location, files: list[LocalFile],
           progress: Progress | None = None, workers: int = WORKERS,
           stop: threading.Event | None = None) -> tuple[list[RemoteFile], UploadStats]:
    """Every file's chunks into the bucket, those it lacks only; returns the files as
    chunk lists. A chunk is put whole (S3 has no partial objects), so a push killed
    half-way leaves whole chunks that the next one finds and skips."""
    stats = UploadStats()
    started = time.monotonic()
    seen: set[str] = set()  # this push's digests (the main thread's only)
    listed = _listed_chunks(store, location)

    def put_missing(piece: chunks.Piece) -> None:
        key = location.chunk_key(piece.digest)
        there = key in listed if listed is not None else store.exists(key)
        if there:
            stats.skipped()
        else:
            body = chunks.encode(piece.data)
            store.put(key, body)
            stats.sent(len(body))
            faults.point("push.uploaded")
        if progress is not None:
            progress(piece.length)

    remote: list[RemoteFile] = []
    with ThreadPoolExecutor(workers, thread_name_prefix="s3-put") as pool:
        bounded = _Bounded(pool, workers * 2, stop)
        try:
            for local in files:
                refs: list[ChunkRef] = []
                for piece in chunks.pieces(local.source, local.cutting):
                    refs.append(ChunkRef(offset=piece.offset, length=piece.length,
                                         digest=piece.digest))
                    stats.total_bytes += piece.length
                    stats.chunks += 1
                    if piece.digest in seen:  # twice in this push: put (or found) once
                        stats.skipped()
                        if progress is not None:
                            progress(piece.length)
                        continue
                    seen.add(piece.digest)
                    bounded.submit(lambda piece=piece: put_missing(piece))  # type: ignore[misc]
                info = local.source.stat()
                remote.append(RemoteFile(path=local.path, size=info.st_size,
                                         cutting=local.cutting, chunks=refs))
                if progress is not None:  # allocated zeros are not sent: done all the same
                    progress(max(0, info.st_blocks * 512 - sum(r.length for r in refs)))
        finally:
            bounded.finish()
    stats.seconds = time.monotonic() - started
    return remote, stats


def _listed_chunks(store: ObjectStore, location: Location) -> set[str] | None:
    """The prefix's chunk keys from a listing (1000 a request), when it holds at most
    LIST_PAGES pages of them; else None, and each chunk is asked about (HEAD) instead.
    Each request costs the client ~1.5 ms of Python here (botocore): a 2 GiB guest's
    snapshot is ~2,200 chunks. A chunk put by someone else after the listing is put
    again (the same bytes under the same name: harmless)."""
    try:
        return set(store.keys(location.chunks_prefix, max_pages=LIST_PAGES))
    except Truncated:
        return None


def download(store: ObjectStore, location: Location, files: list[RemoteFile], into: Path,
             progress: Progress | None = None, workers: int = WORKERS,
             stop: threading.Event | None = None, *, resume: bool = False) -> int:
    """The files under `into`, sparse: each chunk fetched, checked against its hash and
    written at its offset. Not flushed (the caller does). `resume`: `into` may hold them
    in part already (an earlier pull's, killed or failed): a chunk whose bytes are there,
    by its hash, is not fetched again. Returns how many chunks were found there."""
    fds: list[int] = []
    found = [0]
    lock = threading.Lock()

    def fetch(remote: RemoteFile, ref: ChunkRef, fd: int) -> None:
        if resume and _already_there(fd, ref):
            with lock:
                found[0] += 1
            if progress is not None:
                progress(ref.length)
            return
        _fetch(store, location, remote, ref, fd, progress)

    try:
        targets = []
        for remote in files:
            target = _inside(into, remote.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if resume else os.O_EXCL)
            fd = os.open(target, flags, 0o644)
            fds.append(fd)
            os.ftruncate(fd, remote.size)
            targets.append((remote, fd))
        with ThreadPoolExecutor(workers, thread_name_prefix="s3-get") as pool:
            bounded = _Bounded(pool, workers * 2, stop)
            try:
                for remote, fd in targets:
                    for ref in remote.chunks:
                        bounded.submit(lambda r=remote, c=ref, fd=fd:  # type: ignore[misc]
                                       fetch(r, c, fd))
            finally:
                bounded.finish()
    finally:
        for fd in fds:
            os.close(fd)
    return found[0]


def _already_there(fd: int, ref: ChunkRef) -> bool:
    """Whether the file holds the chunk's bytes at its offset (its hash says so)."""
    data = os.pread(fd, ref.length, ref.offset)
    return len(data) == ref.length and chunks.digest_of(data) == ref.digest


def _fetch(store: ObjectStore, location: Location, remote: RemoteFile, ref: ChunkRef,
           fd: int, progress: Progress | None) -> None:
    if ref.offset + ref.length > remote.size:
        raise IntegrityError(f"{remote.path}: a chunk ends past the file's size")
    try:
        body = store.get(location.chunk_key(ref.digest))
    except NoSuchObject:
        raise IntegrityError(f"{remote.path}: chunk {ref.digest} is missing from"
                             f" {location}") from None
    try:
        data = chunks.decode(body, ref.length, ref.digest)
    except chunks.ChunkDamaged as exc:
        raise IntegrityError(f"{remote.path}: {exc} (damaged in the bucket)") from None
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, ref.offset + len(data) - len(view))
        if written <= 0:
            raise OperationFailed(f"{remote.path}: short write")
        view = view[written:]
    faults.point("pull.fetched")
    if progress is not None:
        progress(ref.length)


def _inside(root: Path, relative: str) -> Path:
    """`relative` under `root`, refusing anything that would leave it (a hostile manifest)."""
    parts = relative.split("/")
    if not relative or relative.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise IntegrityError(f"the manifest names a file outside the snapshot: {relative!r}")
    return root.joinpath(*parts)


def iter_files(root: Path, skip: tuple[str, ...] = ()) -> Iterator[Path]:
    """Regular files under root, sorted, skipping top-level names in `skip`."""
    for path in sorted(root.rglob("*")):
        if path.relative_to(root).parts[0] in skip or not path.is_file() or path.is_symlink():
            continue
        yield path
