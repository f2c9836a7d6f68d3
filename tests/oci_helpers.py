"""Real parts for the image tests: Debian's docker-registry on loopback, images built
with umoci (a static busybox one, a debootstrapped Debian one) and pushed with skopeo,
and a small registry front for the faults a real registry does not make on demand
(bearer-token auth, 401/404/500, truncated and wrong-digest blobs)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from torpor.paths import cache_home

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "httpd", "cat", "ls", "env", "id", "echo", "test", "sleep", "wget")
# The Debian image the tests boot: debootstrap minbase plus python3, built once per
# recipe and cached (a minute; the suite's later runs reuse it).
DEBIAN_RECIPE = "bookworm minbase +python3 v2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*cmd: str, cwd: Path | None = None) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)}: {result.stderr}"


# --- the registry ---------------------------------------------------------------------------

@contextmanager
def docker_registry(storage: Path) -> Iterator[str]:
    """Debian's docker-registry (the CNCF distribution registry) on 127.0.0.1; yields
    its host:port."""
    port = free_port()
    storage.mkdir(parents=True, exist_ok=True)
    config = storage / "config.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {storage}/data\n"
                      f"http:\n  addr: 127.0.0.1:{port}\nlog:\n  level: warn\n")
    with open(storage / "registry.log", "w") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None, (storage / "registry.log").read_text()
                assert time.monotonic() < deadline, "docker-registry did not listen"
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def push(layout: Path, tag: str, destination: str) -> None:
    _run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
         f"docker://{destination}")


# --- images ------------------------------------------------------------------------------------

def _new_bundle(layout: Path, tag: str, bundle: Path) -> None:
    if not (layout / "oci-layout").exists():
        _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", f"{layout}:{tag}")
    _run("umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle))


def busybox_image(layout: Path, tag: str = "web", *, cmd: list[str] | None = None,
                  env: tuple[str, ...] = ("GREETING=hello from the image",),
                  workdir: str = "/www", extra_layer_marker: str = "") -> None:
    """A static busybox image in two layers: the first has /etc/deleteme, the second
    deletes it (a whiteout) and adds /www/index.html. Its CMD prints a line and serves
    /www over HTTP on port 8080."""
    bundle = layout.parent / f"bundle-{tag}"
    shutil.rmtree(bundle, ignore_errors=True)
    _new_bundle(layout, tag, bundle)
    root = bundle / "rootfs"
    for d in ("bin", "etc", "www"):
        (root / d).mkdir(exist_ok=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc" / "deleteme").write_text("the second layer deletes this\n")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                         "nobody:x:65534:65534:nobody:/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    _run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:{tag}", str(bundle))
    (root / "etc" / "deleteme").unlink()
    (root / "www" / "index.html").write_text(f"hello from the image{extra_layer_marker}\n")
    _run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:{tag}", str(bundle))
    command = cmd or ["sh", "-c", "echo serving on 8080; exec httpd -f -p 8080 -h /www"]
    args = [f"--config.cmd={c}" for c in command]
    args += [f"--config.env={e}" for e in env]
    _run("umoci", "config", "--image", f"{layout}:{tag}", *args,
         f"--config.workingdir={workdir}")
    shutil.rmtree(bundle)


def distroless_image(layout: Path, tag: str = "distroless") -> None:
    """An image with one static binary and nothing else: no shell, no libc, no /etc
    (busybox stands in for a static Go server). Its ENTRYPOINT serves / over HTTP."""
    bundle = layout.parent / f"bundle-{tag}"
    shutil.rmtree(bundle, ignore_errors=True)
    _new_bundle(layout, tag, bundle)
    shutil.copy(BUSYBOX, bundle / "rootfs" / "busybox")  # runs applets by argv[1]
    (bundle / "rootfs" / "index.html").write_text("hello from distroless\n")
    _run("umoci", "repack", "--refresh-bundle", "--image", f"{layout}:{tag}", str(bundle))
    _run("umoci", "config", "--image", f"{layout}:{tag}", "--config.entrypoint=/busybox",
         "--config.cmd=httpd", "--config.cmd=-f", "--config.cmd=-v", "--config.cmd=-p",
         "--config.cmd=8080", "--config.cmd=-h", "--config.cmd=/")
    shutil.rmtree(bundle)


def debian_image() -> Path:
    """The Debian image's OCI layout (tag `python`), built once and cached: debootstrap
    minbase with python3, whose CMD serves /srv over HTTP on port 8000 as `nobody`."""
    recipe = hashlib.sha256(DEBIAN_RECIPE.encode()).hexdigest()[:12]
    cached = cache_home() / "test-images" / f"debian-python-{recipe}"
    if (cached / "index.json").exists():
        return cached
    staging = cached.with_name(cached.name + f".staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    layout, bundle = staging / "layout", staging / "bundle"
    _new_bundle(layout, "python", bundle)
    root = bundle / "rootfs"
    _run("debootstrap", "--variant=minbase", "--include=python3", "bookworm",
         str(root), "http://deb.debian.org/debian")
    shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (root / "srv" / "index.html").write_text("hello from debian\n")
    _run("umoci", "repack", "--image", f"{layout}:python", str(bundle))
    _run("umoci", "config", "--image", f"{layout}:python", "--config.user=nobody",
         "--config.workingdir=/srv", "--config.env=PYTHONUNBUFFERED=1",
         "--config.cmd=sh", "--config.cmd=-c",
         "--config.cmd=echo uid=$(id -u); exec python3 -m http.server 8000")
    shutil.rmtree(bundle)
    os.rename(layout, cached)
    shutil.rmtree(staging, ignore_errors=True)
    return cached


# --- a registry front that misbehaves on request ------------------------------------------------

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


class Blobs:
    """An image's manifest and blobs, read from an OCI layout, as a registry serves them."""

    def __init__(self, layout: Path, tag: str) -> None:
        self.extra: dict[str, bytes] = {}
        index = json.loads((layout / "index.json").read_text())
        entry = next(m for m in index["manifests"]
                     if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        self.layout = layout
        self.manifest_digest = entry["digest"]
        self.manifest = self.blob(self.manifest_digest)
        parsed = json.loads(self.manifest)
        self.layers = [layer["digest"] for layer in parsed["layers"]]

        # The same image built for arm64 (its config says so), and an index of both.
        config = json.loads(self.blob(parsed["config"]["digest"]))
        config["architecture"] = "arm64"
        arm_config = self.add(json.dumps(config).encode())
        parsed["config"] = {**parsed["config"], "digest": arm_config,
                            "size": len(self.extra[arm_config])}
        self.arm64_manifest = self.add(json.dumps(parsed).encode())
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [
                     {"mediaType": MANIFEST_TYPE, "digest": digest, "size": len(self.blob(digest)),
                      "platform": {"architecture": arch, "os": "linux"}}
                     for digest, arch in ((self.arm64_manifest, "arm64"),
                                          (self.manifest_digest, "amd64"))]}
        self.index = json.dumps(index).encode()

    def add(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.extra[digest] = data
        return digest

    def blob(self, digest: str) -> bytes:
        if digest in self.extra:
            return self.extra[digest]
        algo, hex_digest = digest.split(":")
        return (self.layout / "blobs" / algo / hex_digest).read_bytes()


class FaultyRegistry:
    """Serves one repository (`test/img`) from an OCI layout, with bearer-token auth when
    `credentials` are set, and the fault `mode` asks for: "ok", "manifest-404",
    "manifest-500", "unauthorized", "truncated-blob", "wrong-blob"; or what the tag names:
    "index" (an index of arm64 and amd64), "arm64" (the arm64 image alone)."""

    TOKEN = "t0ken"

    def __init__(self, blobs: Blobs, credentials: tuple[str, str] | None = None) -> None:
        self.blobs = blobs
        self.credentials = credentials
        self.mode = "ok"
        self.requests: list[str] = []
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self.handle_request(head=True)

            def do_GET(self) -> None:
                self.handle_request(head=False)

            def handle_request(self, head: bool) -> None:
                registry.requests.append(self.path)
                if self.path.startswith("/token"):
                    return self.token()
                if not self.authorized():
                    return self.answer(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', head,
                                       {"WWW-Authenticate": registry.challenge()})
                if self.path == "/v2/":
                    return self.answer(200, b"{}", head)
                if "/manifests/" in self.path:
                    if registry.mode == "manifest-404":
                        return self.answer(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN",'
                                           b'"message":"manifest unknown"}]}', head)
                    if registry.mode == "manifest-500":
                        return self.answer(500, b"internal error", head)
                    wanted = self.path.rsplit("/", 1)[1]
                    if wanted.startswith("sha256:"):
                        body, media = blobs.blob(wanted), MANIFEST_TYPE
                    elif registry.mode == "index":
                        body, media = blobs.index, "application/vnd.oci.image.index.v1+json"
                    elif registry.mode == "arm64":
                        body, media = blobs.blob(blobs.arm64_manifest), MANIFEST_TYPE
                    else:
                        body, media = blobs.manifest, MANIFEST_TYPE
                    digest = "sha256:" + hashlib.sha256(body).hexdigest()
                    return self.answer(200, body, head, {
                        "Content-Type": media, "Docker-Content-Digest": digest})
                if "/blobs/" in self.path:
                    digest = self.path.rsplit("/", 1)[1]
                    data = blobs.blob(digest)
                    if digest in blobs.layers and registry.mode == "truncated-blob":
                        return self.truncated(data)
                    if digest in blobs.layers and registry.mode == "wrong-blob":
                        data = bytes(b ^ 0xFF for b in data)
                    return self.answer(200, data, head,
                                       {"Content-Type": "application/octet-stream"})
                return self.answer(404, b"{}", head)

            def authorized(self) -> bool:
                if registry.mode == "unauthorized":
                    return False
                if registry.credentials is None:
                    return True
                return self.headers.get("Authorization") == f"Bearer {registry.TOKEN}"

            def token(self) -> None:
                user, password = registry.credentials or ("", "")
                expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
                if self.headers.get("Authorization") != expected:
                    return self.answer(401, b'{"errors":[{"code":"DENIED"}]}', False)
                return self.answer(200, json.dumps({"token": registry.TOKEN}).encode(), False,
                                   {"Content-Type": "application/json"})

            def truncated(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True

            def answer(self, code: int, body: bytes, head: bool,
                       headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def challenge(self) -> str:
        return (f'Bearer realm="http://{self.address}/token",service="test",'
                f'scope="repository:test/img:pull"')

    def __enter__(self) -> FaultyRegistry:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def add_layer(layout: Path, base: str, tag: str, name: str, content: str) -> None:
    """`tag`: the image `base` plus one layer holding /`name`."""
    bundle = layout.parent / f"bundle-{tag}"
    shutil.rmtree(bundle, ignore_errors=True)
    _run("umoci", "unpack", "--image", f"{layout}:{base}", str(bundle))
    (bundle / "rootfs" / name).write_text(content)
    _run("umoci", "repack", "--image", f"{layout}:{tag}", str(bundle))
    shutil.rmtree(bundle)
