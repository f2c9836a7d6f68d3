"""Snapshots pushed to and pulled from a real S3 server (SeaweedFS on 127.0.0.1).

Two data roots stand for two hosts: host A (the session's) pushes, host B pulls and
forks. Each test pushes under a prefix of its own in one bucket."""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import read_marks, run, sh, torpor_cli, write_marks
from tests.s3_helpers import S3Server, seaweedfs
from torpor import faults
from torpor.errors import AlreadyExists, Busy, IntegrityError, NotFound, Unsupported
from torpor.instances.context import Settings
from torpor.manager import InstanceManager
from torpor.remote import chunks, locks, transfer
from torpor.remote.location import parse_location
from torpor.remote.manifest import RemoteSnapshot
from torpor.remote.store import ObjectStore

pytestmark = pytest.mark.qemu

BUCKET = "torpor-fleet"
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """The server, and the standard AWS variables pointing this process at it."""
    with tempfile.TemporaryDirectory(prefix="tp-s3-") as tmp, seaweedfs(Path(tmp)) as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        server.client().create_bucket(Bucket=BUCKET)
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def prefix() -> str:
    return f"s3://{BUCKET}/t{next(_prefixes)}"


@pytest.fixture(scope="module")
def host_b() -> Iterator[InstanceManager]:
    root = Path(tempfile.mkdtemp(prefix="tpb-", dir="/tmp"))
    manager = InstanceManager(root, Settings(accel=os.environ.get("TORPOR_ACCEL", "auto")))  # type: ignore[arg-type]
    yield manager
    for info in run(manager.list_all()):
        run(manager.delete(info.name, force=True))
    import shutil
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def source(manager: InstanceManager, s3: S3Server) -> Iterator[tuple[str, str]]:
    """A running guest on host A with marks in RAM and on disk, snapshotted as `base`."""
    name = "rsrc"
    run(manager.create(name, memory_bytes=512 << 20))
    run(manager.start(name))
    marks = write_marks(manager, name, ram_mib=16, disk_mib=8)
    run(manager.snapshot_create(name, "base"))
    yield name, marks
    for snap in manager.snapshot_list(name):
        run(manager.snapshot_delete(snap.id))
    run(manager.delete(name, force=True))


def push_cli(data_root: Path, url: str, snapshot: str = "base", *more: str,
             env: dict[str, str] | None = None) -> dict[str, float]:
    result = torpor_cli(data_root, "--local", "snapshot", "push", snapshot, url,
                        "--instance", "rsrc", "--json", *more, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def chunks_in(s3: S3Server, url: str) -> set[str]:
    location = parse_location(url)
    pages = s3.client().get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=location.chunks_prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def remote_manifest(s3: S3Server, url: str, name: str = "base") -> RemoteSnapshot:
    key = parse_location(url).manifest_key(name)
    body = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return RemoteSnapshot.decode(body, key)


def nothing_imported(host: InstanceManager) -> None:
    assert host.snapshot_list() == []
    staged = [p.name for p in host.data_root.snapshots_dir.iterdir()] \
        if host.data_root.snapshots_dir.exists() else []
    assert staged == [], staged


# --- the round trip ---------------------------------------------------------------------

def test_push_then_pull_and_fork_on_another_host_keeps_ram_and_disk(
        manager: InstanceManager, data_root: Path, host_b: InstanceManager,
        source: tuple[str, str], s3: S3Server, prefix: str) -> None:
    name, marks = source
    report = push_cli(data_root, prefix)
    assert set(report) == {"uploaded_bytes", "total_bytes", "chunks", "skipped_chunks",
                           "seconds"}
    assert report["uploaded_bytes"] > 8 << 20 and report["chunks"] > 16
    assert len(chunks_in(s3, prefix)) == report["chunks"] - report["skipped_chunks"]

    listed = run(host_b.remote_list(prefix))
    assert [(i.name, i.source_name, i.kind) for i in listed] == [("base", name, "running")]

    info = run(host_b.snapshot_pull(f"{prefix}/base", name="moved"))
    assert info.name == "moved" and info.tags["torpor.pulled-from"] == f"{prefix}/base"
    forks = run(host_b.snapshot_fork("moved", "far"))
    assert [f.state for f in forks] == ["running"]
    assert read_marks(host_b, "far") == marks  # RAM (tmpfs) and disk, as on host A
    run(host_b.delete("far", force=True))
    run(host_b.snapshot_delete("moved"))


@pytest.mark.parametrize("existing", ["listed", "asked"])
def test_a_second_push_after_a_small_change_uploads_a_small_fraction(
        manager: InstanceManager, data_root: Path, source: tuple[str, str],
        prefix: str, existing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the bucket has is known from a listing of its chunks, or (a prefix too large
    to list) asked chunk by chunk: either way only what is missing goes up."""
    name, _ = source
    if existing == "asked":
        monkeypatch.setattr(transfer, "_listed_chunks", lambda store, location: None)
    first = run(manager.snapshot_push("base", prefix, source=name)).model_dump()
    sh(manager, name, "dd if=/dev/urandom of=/root/small.bin bs=64k count=16 2>/dev/null; sync")
    run(manager.snapshot_create(name, f"later-{existing}"))
    second = run(manager.snapshot_push(f"later-{existing}", prefix, source=name)).model_dump()
    # Without content addressing it would be the whole snapshot again (1.0).
    share = second["uploaded_bytes"] / first["uploaded_bytes"]
    print(f"second push: {second['uploaded_bytes']} of {first['uploaded_bytes']} bytes"
          f" ({share:.2f}); {second['skipped_chunks']} of {second['chunks']} chunks skipped")
    assert share < 0.4
    assert second["skipped_chunks"] > second["chunks"] / 2
    # The same snapshot again: everything is there.
    again = push_cli(data_root, prefix, f"later-{existing}")
    assert again["uploaded_bytes"] == 0 and again["skipped_chunks"] == again["chunks"]


# --- interrupted, damaged, incompatible ----------------------------------------------------

def test_a_killed_push_resumes_and_is_invisible_until_complete(
        manager: InstanceManager, data_root: Path, host_b: InstanceManager,
        source: tuple[str, str], s3: S3Server, prefix: str) -> None:
    result = torpor_cli(data_root, "--local", "snapshot", "push", "base", prefix, "--instance",
                        "rsrc", env={faults.ENV: "push.uploaded=kill"})
    assert result.returncode == -9, result.stderr
    there = chunks_in(s3, prefix)
    assert there, "killed after its first chunk: at least that one is in the bucket"
    assert run(host_b.remote_list(prefix)) == []  # no manifest: not a snapshot yet
    with pytest.raises(NotFound):
        run(host_b.snapshot_pull(f"{prefix}/base"))

    left = locks_in(s3, prefix)
    assert len(left) == 1, left  # the killed push's lock stays behind...

    resumed = push_cli(data_root, prefix)
    assert resumed["skipped_chunks"] >= len(there)
    assert resumed["uploaded_bytes"] < resumed["total_bytes"]
    assert [i.name for i in run(host_b.remote_list(prefix))] == ["base"]
    # ...but its process is gone from this host: a delete goes ahead, and removes it.
    run(host_b.remote_delete(f"{prefix}/base"))
    assert locks_in(s3, prefix) == [] and chunks_in(s3, prefix) == set()


def fetched_count(out: Path) -> int:
    return len(out.read_text().splitlines()) if out.exists() else 0


def counting_fetches(out: Path) -> dict[str, str]:
    """The environment that makes a pull append a line to `out` per chunk it fetches."""
    return {faults.ENV: "pull.fetched=exec", faults.EXEC_ENV: f"echo >> {out}"}


@pytest.mark.parametrize("action", ["error", "kill"])
def test_a_failed_pull_imports_nothing_and_the_next_one_resumes(
        data_root: Path, host_b: InstanceManager, source: tuple[str, str], s3: S3Server,
        prefix: str, tmp_path: Path, action: str) -> None:
    push_cli(data_root, prefix)
    url = f"{prefix}/base"
    result = torpor_cli(host_b.data_root.root, "--local", "snapshot", "pull", url,
                        "--name", f"fail-{action}", env={faults.ENV: f"pull.downloaded={action}"})
    assert result.returncode == (-9 if action == "kill" else 1), result.stderr
    assert host_b.snapshot_list() == []
    problems = run(host_b.check())  # what it left: named as a pull `check --repair` removes
    assert [(p.kind, p.detail) for p in problems] == [
        ("partial-snapshot", f"a pull of {url} that did not finish: pulling it again resumes it")]
    fetched = tmp_path / "fetched"
    result = torpor_cli(host_b.data_root.root, "--local", "snapshot", "pull", url, "--name",
                        f"resumed-{action}", env=counting_fetches(fetched))
    assert result.returncode == 0, result.stderr
    # Every chunk was there; only what a pull rewrites after downloading it (the instance
    # metadata's image paths, the RAM file's identity in the state's manifest) is not.
    rewritten = sum(len(f.chunks) for f in remote_manifest(s3, prefix).files
                    if f.path.endswith(("metadata.json", "manifest.json")))
    assert fetched_count(fetched) <= rewritten, (fetched_count(fetched), rewritten)
    assert [s.name for s in host_b.snapshot_list()] == [f"resumed-{action}"]
    assert run(host_b.check()) == []
    run(host_b.snapshot_delete(f"resumed-{action}"))
    nothing_imported(host_b)


def test_a_pull_killed_mid_download_resumes_and_fetches_what_is_missing_or_wrong(
        data_root: Path, host_b: InstanceManager, source: tuple[str, str], s3: S3Server,
        prefix: str, tmp_path: Path) -> None:
    _, marks = source
    push_cli(data_root, prefix)
    url = f"{prefix}/base"
    total = sum(len(f.chunks) for f in remote_manifest(s3, prefix).files)
    result = torpor_cli(host_b.data_root.root, "--local", "snapshot", "pull", url,
                        env={faults.ENV: "pull.fetched=kill"})
    assert result.returncode == -9, result.stderr
    [partial] = host_b.data_root.snapshots_dir.glob(".creating-*")
    state = partial / "payload" / "snapshots" / "latest" / "machine-state"
    with open(state, "r+b") as f:  # what a crash could leave: bytes that are not the chunk's
        f.write(b"\xff" * 4096)
    fetched = tmp_path / "fetched"
    result = torpor_cli(host_b.data_root.root, "--local", "snapshot", "pull", url,
                        env=counting_fetches(fetched))
    assert result.returncode == 0, result.stderr  # the state's checksum held: refetched
    assert 0 < fetched_count(fetched) < total, (fetched_count(fetched), total)
    [fork] = run(host_b.snapshot_fork("base", "resumed-fork"))
    assert read_marks(host_b, fork.name) == marks  # RAM and disk as pushed
    run(host_b.delete(fork.name, force=True))
    run(host_b.snapshot_delete("base"))
    nothing_imported(host_b)


def test_a_corrupted_chunk_is_detected_at_pull_and_nothing_is_imported(
        data_root: Path, host_b: InstanceManager, source: tuple[str, str], s3: S3Server,
        prefix: str) -> None:
    push_cli(data_root, prefix)
    state = next(f for f in remote_manifest(s3, prefix).files if f.cutting == "stream")
    victim = state.chunks[len(state.chunks) // 2]
    key = parse_location(prefix).chunk_key(victim.digest)
    body = bytearray(chunks.decode(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read(),
                                   victim.length, victim.digest))
    body[100] ^= 0xFF  # one flipped bit of guest data, stored as a valid frame
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=chunks.encode(bytes(body)))
    with pytest.raises(IntegrityError, match="does not hash to its name"):
        run(host_b.snapshot_pull(f"{prefix}/base"))
    nothing_imported(host_b)


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("qemu_version", "9.9.9", r"saved by QEMU 9\.9\.9; this host has 7\."),
    ("machine", "pc-q35-99.0", "needs machine type pc-q35-99.0"),
    ("cpu_model", "no-such-cpu", "needs CPU model no-such-cpu"),
    ("memory_backing", "hugepages", "needs memory backing 'hugepages'"),
])
def test_a_snapshot_from_an_incompatible_host_is_refused_before_download(
        data_root: Path, host_b: InstanceManager, source: tuple[str, str], s3: S3Server,
        prefix: str, field: str, value: str, reason: str) -> None:
    push_cli(data_root, prefix)
    manifest = remote_manifest(s3, prefix)
    setattr(manifest.needs, field, value)  # as a host with another QEMU would have pushed
    client = s3.client()
    client.put_object(Bucket=BUCKET, Key=parse_location(prefix).manifest_key("base"),
                      Body=manifest.encode())
    # With its chunks gone, a pull that downloaded anything would fail on a missing chunk.
    client.delete_objects(Bucket=BUCKET, Delete={"Objects": [
        {"Key": k} for k in chunks_in(s3, prefix)]})
    with pytest.raises(Unsupported, match=reason):
        run(host_b.snapshot_pull(f"{prefix}/base"))
    nothing_imported(host_b)


# --- listing and deleting -------------------------------------------------------------------

def test_remote_delete_keeps_the_chunks_another_snapshot_uses(
        manager: InstanceManager, data_root: Path, host_b: InstanceManager,
        source: tuple[str, str], s3: S3Server, prefix: str) -> None:
    name, _ = source
    push_cli(data_root, prefix)
    push_cli(data_root, prefix, "base", "--name", "copy")  # the same chunks, a second manifest
    run(manager.snapshot_create(name, "other"))
    with pytest.raises(AlreadyExists):  # another snapshot under a taken name: refused
        run(manager.snapshot_push("other", prefix, source=name, remote_name="copy"))
    run(manager.snapshot_delete("other", name))
    result = torpor_cli(data_root, "--local", "snapshot", "remote-delete", f"{prefix}/base",
                        "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["removed_chunks"] == 0 and report["kept_chunks"] > 0
    info = run(host_b.snapshot_pull(f"{prefix}/copy", name="kept"))
    assert info.kind == "running"
    report = run(host_b.remote_delete(f"{prefix}/copy"))
    assert report.removed_chunks > 0 and report.kept_chunks == 0
    assert chunks_in(s3, prefix) == set() and run(host_b.remote_list(prefix)) == []
    run(host_b.snapshot_delete("kept"))


# --- a push and a delete under one prefix (remote/locks.py) ---------------------------------

def locks_in(s3: S3Server, url: str) -> list[str]:
    location = parse_location(url)
    answer = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=location.locks_prefix)
    return [item["Key"] for item in answer.get("Contents", [])]


def cli_line(args: str, out: Path) -> str:
    """A shell line running the torpor CLI (the caller's environment) into `out`, with
    its exit status appended: what a fault point's `exec` runs mid-operation."""
    return (f"{sys.executable} -m torpor.cli.main --local {args} > {out} 2>&1;"
            f" echo exit=$? >> {out}")


def test_a_remote_delete_is_refused_while_a_push_runs_under_the_prefix(
        data_root: Path, host_b: InstanceManager, source: tuple[str, str], s3: S3Server,
        prefix: str, tmp_path: Path) -> None:
    push_cli(data_root, prefix, "base", "--name", "old")
    out = tmp_path / "delete.out"
    # Mid-push (its lock written, no chunk looked at yet), the delete of a snapshot whose
    # chunks the push is about to find present and skip.
    push_cli(data_root, prefix, "base", "--name", "new",
             env={faults.ENV: "push.locked=exec",
                  faults.EXEC_ENV: cli_line(f"snapshot remote-delete {prefix}/old", out)})
    said = out.read_text()
    assert "exit=5" in said and "a push is running there" in said, said  # Busy
    assert len(said.splitlines()) == 2, said  # one line, and the exit status
    assert sorted(i.name for i in run(host_b.remote_list(prefix))) == ["new", "old"]
    assert locks_in(s3, prefix) == []  # the push took its lock away
    report = run(host_b.remote_delete(f"{prefix}/old"))  # no push now: it goes through
    assert report.removed_chunks == 0 and report.kept_chunks > 0  # "new" uses them all
    info = run(host_b.snapshot_pull(f"{prefix}/new", name="after-delete"))
    assert info.kind == "running"
    run(host_b.snapshot_delete("after-delete"))


def test_a_push_is_refused_while_a_remote_delete_runs_under_the_prefix(
        data_root: Path, host_b: InstanceManager, source: tuple[str, str], s3: S3Server,
        prefix: str, tmp_path: Path) -> None:
    push_cli(data_root, prefix, "base", "--name", "old")
    out = tmp_path / "push.out"
    result = torpor_cli(
        data_root, "--local", "snapshot", "remote-delete", f"{prefix}/old", "--json",
        env={faults.ENV: "remote-delete.locked=exec",
             faults.EXEC_ENV: cli_line(f"snapshot push base {prefix} --instance rsrc"
                                       " --name new", out)})
    assert result.returncode == 0, result.stderr
    said = out.read_text()
    assert "exit=5" in said and "a remote-delete is running there" in said, said
    assert json.loads(result.stdout)["removed_chunks"] > 0
    assert run(host_b.remote_list(prefix)) == [] and chunks_in(s3, prefix) == set()
    assert locks_in(s3, prefix) == []


def test_a_lock_counts_while_its_holder_lives_and_not_after(
        data_root: Path, host_b: InstanceManager, source: tuple[str, str], s3: S3Server,
        prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    push_cli(data_root, prefix, "base", "--name", "old")
    location = parse_location(prefix)
    # A push on another host (its process cannot be checked from here): it counts...
    elsewhere = locks.LockRecord(kind="push", host="elsewhere.example",
                                 pid=1, start_time=1,
                                 since=datetime.now(UTC))
    s3.client().put_object(Bucket=BUCKET, Key=location.lock_key("push-elsewhere"),
                           Body=elsewhere.model_dump_json().encode())
    with pytest.raises(Busy, match=re.escape("a push is running there (from elsewhere.example")):
        run(host_b.remote_delete(f"{prefix}/old"))
    assert run(host_b.remote_list(prefix)) != []  # nothing deleted
    # ...until it has not been rewritten for TTL (the server's clock): then it is removed.
    monkeypatch.setattr(locks, "TTL", 0.0)
    run(host_b.remote_delete(f"{prefix}/old"))
    assert run(host_b.remote_list(prefix)) == [] and locks_in(s3, prefix) == []


def test_a_held_lock_is_rewritten_until_released(s3: S3Server, prefix: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    location = parse_location(prefix)
    store = ObjectStore(BUCKET)
    rewritten = threading.Event()
    puts: list[str] = []
    real_put = store.put

    def put(key: str, body: bytes) -> None:
        real_put(key, body)
        puts.append(key)
        if len(puts) >= 3:  # written, then rewritten twice by the heartbeat
            rewritten.set()

    monkeypatch.setattr(store, "put", put)
    monkeypatch.setattr(locks, "HEARTBEAT", 0.05)
    with locks.held(store, location, "push"):
        assert rewritten.wait(30), puts
        assert locks_in(s3, prefix) == [puts[0]]
    assert len(set(puts)) == 1 and locks_in(s3, prefix) == []


@pytest.mark.parametrize(("argv", "message"), [
    (("snapshot", "pull", "http://example/x"), "not an S3 location"),
    (("snapshot", "pull", f"s3://{BUCKET}"), "names no snapshot"),
    (("snapshot", "pull", "s3://no-such-bucket-here/p/base"), "does not exist"),
    (("snapshot", "remote-list", "s3://Bad_Bucket/p"), "invalid bucket name"),
])
def test_bad_locations_are_one_line_errors(data_root: Path, s3: S3Server,
                                           argv: tuple[str, ...], message: str) -> None:
    result = torpor_cli(data_root, "--local", *argv)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("torpor: error: ") and message in lines[0], lines


def test_missing_credentials_are_named(data_root: Path, source: tuple[str, str],
                                       prefix: str) -> None:
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}  # empty: unset to boto3
    result = torpor_cli(data_root, "--local", "snapshot", "push", "base", prefix, "--instance",
                        "rsrc", env=env)
    assert result.returncode != 0
    assert "no S3 credentials" in result.stderr, result.stderr


# --- memory-file mode, and the daemon's API --------------------------------------------------

def test_a_memory_file_snapshot_moves_with_its_ram_file(
        manager: InstanceManager, host_b: InstanceManager, s3: S3Server, prefix: str) -> None:
    run(manager.create("rsmf", memory_bytes=512 << 20, memory_backing="file"))
    try:
        run(manager.start("rsmf"))
        marks = write_marks(manager, "rsmf")
        run(manager.snapshot_create("rsmf", "mf"))
        report = run(manager.snapshot_push("mf", prefix, source="rsmf"))
        files = {f.path for f in remote_manifest(s3, prefix, "mf").files}
        assert "memory" in files and report.uploaded_bytes < 256 << 20  # holes not sent
        run(host_b.snapshot_pull(f"{prefix}/mf"))
        forks = run(host_b.snapshot_fork("mf", "mffar"))
        assert [f.state for f in forks] == ["running"]
        assert read_marks(host_b, "mffar") == marks
        run(host_b.delete("mffar", force=True))
        run(host_b.snapshot_delete("mf"))
    finally:
        for snap in manager.snapshot_list("rsmf"):
            run(manager.snapshot_delete(snap.id))
        run(manager.delete("rsmf", force=True))


def test_the_daemon_pushes_pulls_lists_and_deletes_as_operations(
        data_root: Path, source: tuple[str, str], s3: S3Server, prefix: str) -> None:
    from tests.api.conftest import start_daemon, stop_daemon

    push_cli(data_root, prefix)
    daemon = start_daemon()  # a third host, reached through its API
    try:
        with daemon.client() as api:
            listed = api.get("/remote-snapshots", params={"url": prefix})
            assert listed.status_code == 200 and [s["name"] for s in listed.json()] == ["base"]
            pulled = api.post("/snapshots/pull", json={"url": f"{prefix}/base", "name": "api"},
                              headers={"X-Torpor-Operation": "pull-1"})
            assert pulled.status_code == 201, pulled.text
            assert pulled.json()["name"] == "api"
            op = api.get("/operations/pull-1").json()
            assert op["state"] == "succeeded" and op["kind"] == "snapshot-pull"
            download = next(p for p in op["progress"] if p["stage"] == "download")
            assert download["done_bytes"] == download["total_bytes"] > 0
            pushed = api.post("/snapshots/api/push", json={"url": f"{prefix}-again"})
            assert pushed.status_code == 200, pushed.text
            assert pushed.json()["uploaded_bytes"] > 0
            gone = api.delete("/remote-snapshots", params={"url": f"{prefix}-again/api"})
            assert gone.status_code == 200 and gone.json()["removed_chunks"] > 0
            bad = api.get("/remote-snapshots", params={"url": "http://example/x"})
            assert bad.status_code == 400, bad.text  # the API's code for a malformed request
    finally:
        stop_daemon(daemon)
