"""OCI images: pulled by skopeo into one shared OCI layout, unpacked by umoci.

Why skopeo and umoci (docs/design.md, "OCI images"): the registry protocol (token auth,
`~/.docker/config.json`, multi-arch indexes, digest verification, blob reuse) and the
layer semantics (whiteouts, opaque directories, ownership, hard links) are exactly what
they are for, kept by the container ecosystem and packaged by Debian; torpor keeps only
the bookkeeping: which references name which manifest digest, and which images
instances use.

Layout under <data-root>/images/:
  oci/                 an OCI image layout; every image's manifest is tagged by its digest
                       (sha256-<hex>), so blobs are stored once and shared between images
  records/<hex>.json   an image torpor knows: its references, its config, its size
  disks/               its root filesystems, built on first use (imagedisk.py)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from torpor.errors import InvalidArgument, NotFound, OperationFailed, WrongState
from torpor.fsutil import atomic_write_json, read_json
from torpor.paths import DataRoot

PLATFORM = ("linux", "amd64")
DEFAULT_REGISTRY = "docker.io"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
_NAME_RE = re.compile(r"[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
REF_NAME = "org.opencontainers.image.ref.name"

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


class ImageConfig(BaseModel):
    """What the image says to run (the OCI config's `config` object)."""

    entrypoint: list[str] = Field(default_factory=list)
    cmd: list[str] = Field(default_factory=list)
    env: list[str] = Field(default_factory=list)
    workdir: str = ""
    user: str = ""


class ImageRecord(BaseModel):
    digest: str  # the manifest's, "sha256:<hex>"
    references: list[str] = Field(default_factory=list)
    size: int  # bytes of its layers, compressed
    created: str | None = None  # as the image says
    added_at: datetime
    config: ImageConfig

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    @property
    def tag(self) -> str:
        """Its name in the shared OCI layout."""
        return f"sha256-{self.hex}"


# --- references ------------------------------------------------------------------------

def normalize_reference(ref: str) -> str:
    """Docker's rules: `busybox` is docker.io/library/busybox:latest; a first component
    with a dot, a colon or `localhost` is a registry."""
    ref = ref.strip()
    name, digest = ref.split("@", 1) if "@" in ref else (ref, "")
    tag = ""
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = DEFAULT_REGISTRY, name
        if "/" not in path:
            path = f"library/{path}"
    if not _NAME_RE.fullmatch(path) or (tag and not _TAG_RE.fullmatch(tag)) or \
            (digest and not _DIGEST_RE.fullmatch(digest)):
        raise InvalidArgument(f"invalid image reference {ref!r}")
    if digest:
        return f"{registry}/{path}@{digest}"
    return f"{registry}/{path}:{tag or 'latest'}"


def is_digest_ref(ref: str) -> bool:
    """A digest or a prefix of one (12 hex digits or more), with or without sha256:."""
    return re.fullmatch(r"[0-9a-f]{12,64}", ref.removeprefix("sha256:")) is not None


def registry_of(reference: str) -> str:
    return reference.split("/", 1)[0]


def is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.startswith("[") else \
        registry[1:registry.index("]")]
    return host in ("localhost", "::1") or host.startswith("127.")


def docker_auth_file() -> Path | None:
    """Credentials where Docker keeps them ($DOCKER_CONFIG/config.json)."""
    base = os.environ.get("DOCKER_CONFIG")
    path = Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"
    return path if path.is_file() else None


# --- the store ---------------------------------------------------------------------------

class ImageStore:
    def __init__(self, data_root: DataRoot, *, skopeo: str = "skopeo",
                 umoci: str = "umoci") -> None:
        self.data_root = data_root
        self.skopeo = skopeo
        self.umoci = umoci

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One writer of the layout at a time (skopeo rewrites its index.json whole)."""
        self.data_root.ensure()
        self.data_root.image_records_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_root.images_lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    # -- reading --

    def records(self) -> list[ImageRecord]:
        found = []
        directory = self.data_root.image_records_dir
        for path in sorted(directory.glob("*.json")) if directory.exists() else []:
            with contextlib.suppress(OSError, ValueError):
                found.append(ImageRecord.model_validate(read_json(path)))
        return sorted(found, key=lambda r: r.added_at)

    def find(self, ref: str) -> ImageRecord | None:
        """By reference (normalized), by digest, or by a unique digest prefix (≥ 12)."""
        records = self.records()
        if is_digest_ref(ref):
            wanted = ref.removeprefix("sha256:")
            matches = [r for r in records if r.hex.startswith(wanted)]
            if len(matches) == 1:
                return matches[0]
        try:
            normalized = normalize_reference(ref)
        except InvalidArgument:
            return None  # what cannot name an image names none of ours
        for record in records:
            if normalized in record.references or normalized.endswith("@" + record.digest):
                return record
        return None

    def get(self, ref: str) -> ImageRecord:
        record = self.find(ref)
        if record is None:
            raise NotFound(f"no image {ref!r} (torpor image pull {ref})")
        return record

    # -- adding --

    def pull(self, ref: str, *, insecure: bool = False,
             progress: Progress | None = None) -> ImageRecord:
        """Fetch an image (verified by digest; layers already here are not fetched
        again). Plain HTTP only to a loopback registry or with `insecure`."""
        reference = normalize_reference(ref)
        plain = insecure or is_loopback(registry_of(reference))
        source = f"docker://{reference}"
        tls = f"--tls-verify={'false' if plain else 'true'}"
        auth = docker_auth_file()
        auth_args = ["--authfile", str(auth)] if auth is not None else []
        with self.locked():
            total = self._layers_size(source, [tls, *auth_args]) if progress else 0
            copy_args = [tls.replace("--", "--src-", 1), *auth_args]
            return self._copy_in(source, reference, copy_args, progress, total)

    def import_archive(self, path: Path, reference: str | None = None) -> ImageRecord:
        """A docker-archive or oci-archive tarball, or an OCI layout directory (with
        several images in it: DIR:TAG)."""
        source = self._archive_source(path)
        ref = normalize_reference(reference) if reference else None
        with self.locked():
            return self._copy_in(source, ref, [], None, 0)

    def _archive_source(self, path: Path) -> str:
        tag = ""
        if not path.exists() and ":" in path.name:
            name, _, tag = path.name.rpartition(":")
            path = path.with_name(name)
        if not path.exists():
            raise NotFound(f"no such file or directory: {path}")
        if path.is_dir():
            if not (path / "oci-layout").exists():
                raise InvalidArgument(f"{path} is not an OCI image layout (no oci-layout file)")
            tags = [m.get("annotations", {}).get(REF_NAME, "?") for m in
                    read_json(path / "index.json").get("manifests", [])]
            if not tag and len(tags) > 1:
                raise InvalidArgument(f"{path} holds {len(tags)} images: name one as "
                                      f"{path}:TAG (tags: {', '.join(tags)})")
            return f"oci:{path}" + (f":{tag}" if tag else "")
        import tarfile

        try:
            with tarfile.open(path) as tar:
                names = {name.removeprefix("./") for name in tar.getnames()}
        except (tarfile.TarError, OSError) as exc:
            raise InvalidArgument(f"{path} is not an image archive: {exc}") from None
        if "manifest.json" in names:
            return f"docker-archive:{path}"
        if "index.json" in names and "oci-layout" in names:
            return f"oci-archive:{path}"
        raise InvalidArgument(f"{path} is neither a docker-archive nor an oci-archive tarball")

    def _copy_in(self, source: str, reference: str | None, args: list[str],
                 progress: Progress | None, total: int) -> ImageRecord:
        layout = self.data_root.oci_layout
        layout.parent.mkdir(parents=True, exist_ok=True)
        self._sweep_partial_blobs()
        tag = f"torpor-incoming-{os.getpid()}"
        digest_file = self.data_root.tmp_dir / f"{tag}.digest"
        cmd = [self.skopeo, "copy", "--quiet", "--override-os", PLATFORM[0],
               "--override-arch", PLATFORM[1], "--digestfile", str(digest_file), *args,
               source, f"oci:{layout}:{tag}"]
        try:
            what = f"pulling {reference}" if reference else f"importing {source.split(':', 1)[1]}"
            self._run_with_progress(cmd, what, progress, total)
            digest = digest_file.read_text().strip()
        finally:
            digest_file.unlink(missing_ok=True)
        record = self._adopt(tag, digest)
        if reference and reference not in record.references:
            record.references.append(reference)
        if reference is None and not record.references:
            record.references.append(f"sha256:{record.hex}")
        atomic_write_json(self.data_root.image_record(record.hex),
                          record.model_dump(mode="json"))
        return record

    def _adopt(self, incoming_tag: str, digest: str) -> ImageRecord:
        """Read what skopeo wrote, then re-tag its manifest by digest (or drop the tag if
        torpor cannot run it: no image is half-added)."""
        hex_digest = digest.removeprefix("sha256:")
        manifest = self._blob_json(digest)
        config_blob = self._blob_json(manifest["config"]["digest"])
        platform = (config_blob.get("os"), config_blob.get("architecture"))
        self._retag(incoming_tag, f"sha256-{hex_digest}" if platform == PLATFORM else None)
        if platform != PLATFORM:
            raise OperationFailed(f"the image is for {platform[0]}/{platform[1]}; torpor "
                                  f"runs {PLATFORM[0]}/{PLATFORM[1]} images")
        conf = config_blob.get("config") or {}
        path = self.data_root.image_record(hex_digest)
        existing = ImageRecord.model_validate(read_json(path)) if path.exists() else None
        return ImageRecord(
            digest=digest,
            references=existing.references if existing else [],
            size=sum(int(layer.get("size", 0)) for layer in manifest.get("layers", [])),
            created=config_blob.get("created"),
            added_at=existing.added_at if existing else datetime.now(UTC),
            config=ImageConfig(entrypoint=conf.get("Entrypoint") or [],
                               cmd=conf.get("Cmd") or [], env=conf.get("Env") or [],
                               workdir=conf.get("WorkingDir") or "",
                               user=conf.get("User") or ""))

    def _retag(self, old: str, new: str | None) -> None:
        """index.json with `old`'s entry renamed to `new` (dropped if None); an entry
        already named `new` is replaced."""
        layout = self.data_root.oci_layout
        index = read_json(layout / "index.json")
        entries = []
        for entry in index.get("manifests", []):
            annotations = entry.setdefault("annotations", {})
            name = annotations.get(REF_NAME)
            if name == new:
                continue
            if name == old:
                if new is None:
                    continue
                annotations[REF_NAME] = new
            entries.append(entry)
        index["manifests"] = entries
        atomic_write_json(layout / "index.json", index)

    def _blob_json(self, digest: str) -> dict[str, Any]:
        algo, _, hex_digest = digest.partition(":")
        result: dict[str, Any] = json.loads(
            (self.data_root.oci_layout / "blobs" / algo / hex_digest).read_bytes())
        return result

    def _layers_size(self, source: str, args: list[str]) -> int:
        """The layers' total size, for the progress bar (the image's manifest, resolved
        to linux/amd64)."""
        cmd = [self.skopeo, "inspect", "--override-os", PLATFORM[0], "--override-arch",
               PLATFORM[1], *args, source]
        result = subprocess.run(cmd, capture_output=True, check=False)
        if result.returncode != 0:
            raise OperationFailed(f"pulling {source.removeprefix('docker://')} failed: "
                                  f"{skopeo_error(result.stderr)}")
        info = json.loads(result.stdout)
        return sum(int(layer.get("Size") or 0) for layer in info.get("LayersData") or [])

    def _run_with_progress(self, cmd: list[str], what: str, progress: Progress | None,
                           total: int) -> None:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        done = threading.Event()

        def report() -> None:  # bytes landed in the layout since the start
            start = self._blob_bytes()
            while not done.wait(0.2):
                if progress is not None:
                    progress(min(self._blob_bytes() - start, total), total)

        watcher = threading.Thread(target=report, daemon=True)
        watcher.start()
        try:
            _, stderr = proc.communicate()
        finally:
            done.set()
            watcher.join()
        if proc.returncode != 0:
            self._sweep_partial_blobs()
            raise OperationFailed(f"{what} failed: {skopeo_error(stderr)}")
        if progress is not None:
            progress(total, total)

    def _blob_bytes(self) -> int:
        total = 0
        for directory in (self.data_root.oci_layout, self.data_root.oci_layout / "blobs" /
                          "sha256"):
            with contextlib.suppress(OSError):
                for entry in os.scandir(directory):
                    with contextlib.suppress(OSError):
                        if entry.is_file(follow_symlinks=False):
                            total += entry.stat().st_blocks * 512
        return total

    def _sweep_partial_blobs(self) -> None:
        """skopeo writes each blob to a temporary file in the layout and renames it once
        its digest checked out; a killed pull leaves those behind."""
        layout = self.data_root.oci_layout
        if layout.exists():
            for leftover in layout.glob("oci-put-blob*"):
                leftover.unlink(missing_ok=True)

    # -- removing --

    def remove(self, ref: str, in_use_by: list[str]) -> ImageRecord:
        """Forget a reference; the image's data goes with its last reference, unless
        instances use it (`in_use_by`: their names)."""
        with self.locked():
            record = self.get(ref)
            remaining = [] if is_digest_ref(ref) else [
                r for r in record.references if r != normalize_reference(ref)]
            if not remaining and in_use_by:
                raise WrongState(f"image {ref} is used by instance(s) "
                                 f"{', '.join(sorted(in_use_by))}: delete them first")
            if remaining:
                record.references = remaining
                atomic_write_json(self.data_root.image_record(record.hex),
                                  record.model_dump(mode="json"))
                return record
            self._drop(record)
            return record

    def _drop(self, record: ImageRecord) -> None:
        layout = self.data_root.oci_layout
        self._retag(record.tag, None)
        self.data_root.image_record(record.hex).unlink(missing_ok=True)
        for disk in self.data_root.image_disks_dir.glob(f"{record.hex}-*"):
            disk.unlink(missing_ok=True)
        # Blobs no remaining image refers to go (umoci gc keeps what index.json reaches).
        result = subprocess.run([self.umoci, "gc", "--layout", str(layout)],
                                capture_output=True, check=False)
        if result.returncode != 0:
            raise OperationFailed("removing the image's unshared layers failed: "
                                  + result.stderr.decode(errors="replace").strip()[-300:])


_MSG_RE = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
# skopeo 1.9 reports a registry it cannot reach as an error "parsing image name".
_UNREACHABLE_RE = re.compile(r'^Error parsing image name "[^"]*": pinging container registry '
                             r'(\S+): .*: ([^:]+)$')


def skopeo_error(stderr: bytes) -> str:
    """skopeo's fatal message, one line, without its log decoration."""
    text = stderr.decode(errors="replace")
    found = _MSG_RE.findall(text)
    message = found[-1].encode().decode("unicode_escape") if found else text.strip()
    message = re.sub(r"^initializing source \S+: ", "", message)
    if unreachable := _UNREACHABLE_RE.match(message):
        message = f"cannot reach the registry {unreachable[1]}: {unreachable[2]}"
    return " ".join(message.split())[-600:] or "skopeo failed"
