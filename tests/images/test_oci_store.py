"""The image store on real parts, without booting: Debian's docker-registry on loopback,
images built by umoci and pushed by skopeo, a registry front for faults and token auth."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run, torpor_cli
from tests.oci_helpers import Blobs, FaultyRegistry, push
from torpor.errors import InvalidArgument, NotFound, OperationFailed, WrongState
from torpor.images.builtin import GuestImage
from torpor.images.imagedisk import ensure_image_disk
from torpor.images.oci import ImageStore, is_loopback, normalize_reference
from torpor.images.source import OciSource
from torpor.instances.context import Settings
from torpor.manager import InstanceManager
from torpor.paths import DataRoot


@pytest.mark.parametrize(("ref", "normalized"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("owner/app:2", "docker.io/owner/app:2"),
    ("ghcr.io/owner/app", "ghcr.io/owner/app:latest"),
    ("localhost/app:dev", "localhost/app:dev"),
    ("127.0.0.1:5000/a/b:c", "127.0.0.1:5000/a/b:c"),
    ("quay.io/x/y@sha256:" + "a" * 64, "quay.io/x/y@sha256:" + "a" * 64),
])
def test_references_are_normalized_as_docker_does(ref: str, normalized: str) -> None:
    assert normalize_reference(ref) == normalized


@pytest.mark.parametrize("ref", ["UPPER/case", "a b", "x@sha256:short", "app:bad tag", ""])
def test_bad_references_are_refused(ref: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid image reference"):
        normalize_reference(ref)


def test_only_loopback_registries_are_plain_http() -> None:
    assert [is_loopback(r) for r in ("127.0.0.1:5000", "localhost:80", "[::1]:5000",
                                     "registry.example:5000", "10.0.0.1:5000")] == \
        [True, True, True, False, False]


def _blob_files(root: Path) -> dict[str, int]:
    blobs = root / "images" / "oci" / "blobs" / "sha256"
    return {p.name: p.stat().st_ino for p in blobs.iterdir()} if blobs.exists() else {}


def test_pull_verifies_records_and_shares_layers(tmp_path: Path, registry: str,
                                                 image_layout: Path) -> None:
    push(image_layout, "web", f"{registry}/test/web:1")
    push(image_layout, "web-more", f"{registry}/test/web:2")
    store = ImageStore(DataRoot(tmp_path))
    first = store.pull(f"{registry}/test/web:1")
    assert first.config.cmd[-1].endswith("httpd -f -p 8080 -h /www")
    assert "GREETING=hello from the image" in first.config.env
    assert first.config.workdir == "/www"
    layers = [d.split(":")[1] for d in Blobs(image_layout, "web").layers]
    before = _blob_files(tmp_path)
    second = store.pull(f"{registry}/test/web:2")
    after = _blob_files(tmp_path)
    # web:2 is web:1 plus one layer: its manifest, config and that layer are new; the
    # shared layers were not fetched again (the same files: same inodes).
    assert len(set(after) - set(before)) == 3
    assert {k: after[k] for k in layers} == {k: before[k] for k in layers}
    assert second.digest != first.digest
    # pulling again fetches no layer; a second reference to the same digest joins the record
    again = store.pull(f"{registry}/test/web:1")
    assert again.digest == first.digest and set(_blob_files(tmp_path)) == set(after)
    assert {k: _blob_files(tmp_path)[k] for k in layers} == {k: after[k] for k in layers}
    push(image_layout, "web", f"{registry}/test/alias:x")
    alias = store.pull(f"{registry}/test/alias:x")
    assert alias.digest == first.digest
    assert store.get(f"{registry}/test/alias:x").references == [
        f"{registry}/test/web:1", f"{registry}/test/alias:x"]
    assert store.get(first.hex[:12]).digest == first.digest
    with pytest.raises(NotFound, match="torpor image pull"):
        store.get(f"{registry}/test/web:3")


def test_image_disk_applies_whiteouts_and_carries_torpor_in(
        tmp_path: Path, registry: str, image_layout: Path, guest_image: GuestImage) -> None:
    push(image_layout, "web", f"{registry}/test/web:1")
    store = ImageStore(DataRoot(tmp_path))
    disk = ensure_image_disk(store, store.pull(f"{registry}/test/web:1"))

    def debugfs(request: str) -> str:
        return subprocess.run(["debugfs", "-R", request, str(disk)], capture_output=True,
                              text=True, check=True).stdout + ""

    assert debugfs("cat /www/index.html") == "hello from the image\n"
    # the first layer's /etc/deleteme, removed by the second layer's whiteout
    listing = subprocess.run(["debugfs", "-R", "ls -l /etc", str(disk)], capture_output=True,
                             text=True, check=True).stdout
    assert "passwd" in listing and "deleteme" not in listing and ".wh." not in listing
    assert "torpor.init" not in debugfs("cat /.torpor/init")
    assert debugfs("cat /.torpor/init").startswith("#!/.torpor/bin/sh")
    # sparse: the image is ~1 MiB of busybox, the filesystem a few hundred MiB
    assert disk.stat().st_blocks * 512 < disk.stat().st_size / 4
    assert ensure_image_disk(store, store.get(f"{registry}/test/web:1")) == disk


def test_import_docker_archive_oci_archive_and_layout(tmp_path: Path,
                                                      image_layout: Path) -> None:
    store = ImageStore(DataRoot(tmp_path / "root"))
    docker_tar, oci_tar = tmp_path / "docker.tar", tmp_path / "oci.tar"
    for dest in (f"docker-archive:{docker_tar}:test/web:1", f"oci-archive:{oci_tar}"):
        subprocess.run(["skopeo", "copy", "--quiet", f"oci:{image_layout}:web", dest],
                       check=True)
    imported = [store.import_archive(docker_tar),
                store.import_archive(oci_tar, "example.org/web:oci"),
                store.import_archive(Path(f"{image_layout}:web"))]
    for record in imported:
        assert record.config.workdir == "/www", record
    assert "example.org/web:oci" in imported[1].references
    (tmp_path / "notes.txt").write_text("not an image\n")
    subprocess.run(["tar", "cf", str(tmp_path / "junk.tar"), "-C", str(tmp_path),
                    "notes.txt"], check=True)
    with pytest.raises(InvalidArgument, match="neither a docker-archive nor an oci-archive"):
        store.import_archive(tmp_path / "junk.tar")
    with pytest.raises(NotFound):
        store.import_archive(tmp_path / "missing.tar")
    with pytest.raises(InvalidArgument, match=r"holds 2 images.*web, web-more"):
        store.import_archive(image_layout)


def test_rm_is_refused_while_an_instance_uses_the_image(
        tmp_path: Path, registry: str, image_layout: Path, guest_image: GuestImage) -> None:
    push(image_layout, "web", f"{registry}/test/web:1")
    root = tmp_path / "root"
    manager = InstanceManager(root, Settings(accel="tcg"))
    run(manager.image_pull(f"{registry}/test/web:1"))
    info = run(manager.create("user1", oci=OciSource(reference=f"{registry}/test/web:1")))
    assert info.image == f"{registry}/test/web:1" and info.image_digest
    listed = run(manager.image_list())
    assert [(i.used_by, i.disk_built) for i in listed] == [(["user1"], True)]
    with pytest.raises(WrongState, match=r"used by instance.*user1"):
        run(manager.image_remove(f"{registry}/test/web:1"))
    run(manager.delete("user1"))
    run(manager.image_remove(f"{registry}/test/web:1"))
    assert run(manager.image_list()) == []
    assert _blob_files(root) == {}  # its layers went with it
    assert list((root / "images" / "disks").iterdir()) == []


FAULTS = {
    "manifest-404": "manifest unknown",
    "manifest-500": "500 Internal Server Error",
    "unauthorized": "unable to retrieve auth token",
    "truncated-blob": "unexpected EOF",
    "wrong-blob": "Digest did not match",
}


def test_bad_registry_answers_give_one_line_and_leave_no_partial_image(
        tmp_path: Path, registry: str, image_layout: Path) -> None:
    root = tmp_path / "root"
    store = ImageStore(DataRoot(root))
    push(image_layout, "web", f"{registry}/test/web:1")
    kept = store.pull(f"{registry}/test/web:1")
    cache = _blob_files(root)
    index = (root / "images" / "oci" / "index.json").read_text()
    with FaultyRegistry(Blobs(image_layout, "web-more")) as faulty:
        for mode, cause in FAULTS.items():
            faulty.mode = mode
            with pytest.raises(OperationFailed) as failed:
                store.pull(f"{faulty.address}/test/img:1")
            message = failed.value.message
            assert message.startswith(f"pulling {faulty.address}/test/img:1 failed: "), message
            assert cause in message and "\n" not in message, (mode, message)
            # no partial image: no record, no tag, no temporary blob; the cache intact
            assert [r.digest for r in store.records()] == [kept.digest], mode
            assert (root / "images" / "oci" / "index.json").read_text() == index, mode
            assert not list((root / "images" / "oci").glob("oci-put-blob*")), mode
            assert {k: v for k, v in _blob_files(root).items() if k in cache} == cache, mode
        faulty.mode = "ok"  # the same image, served right, pulls fine after all that
        assert store.pull(f"{faulty.address}/test/img:1").digest != kept.digest


def test_a_multi_arch_index_resolves_to_amd64_and_arm64_alone_is_refused(
        tmp_path: Path, image_layout: Path) -> None:
    root = tmp_path / "root"
    store = ImageStore(DataRoot(root))
    blobs = Blobs(image_layout, "web")
    with FaultyRegistry(blobs) as faulty:
        faulty.mode = "arm64"
        with pytest.raises(OperationFailed, match="for linux/arm64; torpor runs linux/amd64"):
            store.pull(f"{faulty.address}/test/img:arm")
        assert store.records() == []
        index = json.loads((root / "images" / "oci" / "index.json").read_text())
        assert index["manifests"] == []  # not even a tag of it is left
        faulty.mode = "index"
        record = store.pull(f"{faulty.address}/test/img:multi")
        assert record.digest == blobs.manifest_digest  # the amd64 entry of the index
        assert record.config.workdir == "/www"


def test_instances_of_a_cached_image_share_its_data_on_xfs(
        xfs_dir: Path, registry: str, image_layout: Path, guest_image: GuestImage) -> None:
    """Creating an instance from a cached image copies none of its data on a reflink
    filesystem (the image's disk is reflinked, then grown)."""
    push(image_layout, "web", f"{registry}/test/web:1")
    root = xfs_dir / "image-root"
    manager = InstanceManager(root, Settings(accel="tcg"))
    run(manager.create("first", oci=OciSource(reference=f"{registry}/test/web:1")))
    disk = next((root / "images" / "disks").iterdir())
    image_bytes = disk.stat().st_blocks * 512
    assert image_bytes > 16 << 20  # the ext4 journal and metadata: enough to see a copy
    free = os.statvfs(root)
    run(manager.create("second", oci=OciSource(reference=f"{registry}/test/web:1")))
    after = os.statvfs(root)
    used = (free.f_bavail - after.f_bavail) * after.f_frsize
    assert used < image_bytes / 4, (used, image_bytes)
    for name in ("first", "second"):
        run(manager.delete(name))


def test_bearer_token_auth_with_docker_config_credentials(
        tmp_path: Path, image_layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ImageStore(DataRoot(tmp_path / "root"))
    with FaultyRegistry(Blobs(image_layout, "web"), credentials=("ann", "s3cret")) as faulty:
        ref = f"{faulty.address}/test/img:1"
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nowhere"))
        with pytest.raises(OperationFailed, match="auth token"):
            store.pull(ref)
        docker_config = tmp_path / "docker"
        docker_config.mkdir()
        auth = base64.b64encode(b"ann:s3cret").decode()
        (docker_config / "config.json").write_text(
            json.dumps({"auths": {faulty.address: {"auth": auth}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(docker_config))
        record = store.pull(ref)
        assert record.references == [ref]
        assert any(r.startswith("/token") for r in faulty.requests)


def test_cli_pull_list_rm_and_errors(tmp_path: Path, registry: str,
                                     image_layout: Path) -> None:
    push(image_layout, "web", f"{registry}/test/web:1")
    root = tmp_path / "root"
    pulled = torpor_cli(root, "image", "pull", f"{registry}/test/web:1")
    assert pulled.returncode == 0 and "pulled" in pulled.stdout, pulled.stderr
    listed = json.loads(torpor_cli(root, "image", "list", "--json").stdout)
    assert [i["references"] for i in listed] == [[f"{registry}/test/web:1"]]
    missing = torpor_cli(root, "image", "pull", f"{registry}/test/nope:1")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "manifest unknown" in missing.stderr, \
        missing.stderr
    bad = torpor_cli(root, "image", "pull", "Bad Ref")
    assert bad.returncode == 2 and "invalid image reference" in bad.stderr
    needs_image = torpor_cli(root, "create", "x", "--env", "A=1")
    assert needs_image.returncode == 2 and "--image" in needs_image.stderr
    archive = tmp_path / "web.tar"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci:{image_layout}:web",
                    f"oci-archive:{archive}"], check=True)
    imported = torpor_cli(root, "image", "import", str(archive), "--as", "example.org/web:2")
    assert imported.returncode == 0 and "example.org/web:2" in imported.stdout, imported.stderr
    both = json.loads(torpor_cli(root, "image", "list", "--json").stdout)
    assert [i["references"] for i in both] == [[f"{registry}/test/web:1", "example.org/web:2"]]
    assert torpor_cli(root, "image", "rm", "example.org/web:2").returncode == 0
    removed = torpor_cli(root, "image", "rm", f"{registry}/test/web:1")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(torpor_cli(root, "image", "list", "--json").stdout) == []
    gone = torpor_cli(root, "image", "rm", f"{registry}/test/web:1")
    assert gone.returncode == 3 and "no image" in gone.stderr
    assert os.path.isdir(root / "images" / "oci")


def test_a_registry_that_cannot_be_reached_is_named_in_one_line(tmp_path: Path) -> None:
    """skopeo calls a refused connection an error "parsing image name"."""
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pulled = torpor_cli(tmp_path / "data", "image", "pull", f"127.0.0.1:{port}/nope:1")
    assert pulled.returncode == 1
    assert pulled.stderr == (f"torpor: error: pulling 127.0.0.1:{port}/nope:1 failed: cannot "
                             f"reach the registry 127.0.0.1:{port}: connection refused\n")
