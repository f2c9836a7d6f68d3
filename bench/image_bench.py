"""OCI images: pull, create and boot, against the built-in guest.

    make bench-images        (python -m bench.image_bench [--runs N])

Everything on loopback: Debian's docker-registry on 127.0.0.1 serves the test suite's
images (tests/oci_helpers.py: a static busybox image, and debootstrap minbase + python3,
built once and cached). Prints four tables:

1. pull: the Debian and busybox images into an empty data root (cold), and again (cached:
   the manifest is fetched, no layer is).
2. create from a cached image, on ext4 (this host's root fs: a sparse copy) and on XFS with
   reflink (a loop device): time and the space the instance's disk takes. A qcow2 overlay
   on the image's disk is the alternative the issue names: its creation is measured too.
3. boot: `start` until the agent answers, and until the image's command serves HTTP (a
   port forward on 127.0.0.1), against the built-in guest's boot to its agent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.oci_helpers import busybox_image, debian_image, docker_registry, free_port, push

from bench.common import remove_work, scratch_manager
from torpor.hypervisor.vmconfig import PortForward
from torpor.images.oci import ImageStore
from torpor.images.source import OciSource
from torpor.instances.context import Settings
from torpor.manager import InstanceManager
from torpor.paths import DataRoot


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def in_loop(coro_fn: Callable[..., object]) -> Callable[..., object]:
    """A manager's async method as a plain call (one event loop per call, as the CLI)."""
    return lambda *args, **kwargs: asyncio.run(coro_fn(*args, **kwargs))  # type: ignore[arg-type]


def median(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}"


def http_ready(port: int, deadline: float) -> None:
    import http.client

    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/")
            conn.getresponse().read()
            conn.close()
            return
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def pull_table(work: Path, refs: dict[str, str]) -> None:
    print("\n## pull (median of cold runs: an empty data root each time)\n")
    print(f"{'image':<10} {'size MiB':>9} {'cold s':>8} {'cached s':>9}")
    for label, ref in refs.items():
        cold, cached, size = [], [], 0
        for run in range(3):
            root = work / f"pull-{label}-{run}"
            store = ImageStore(DataRoot(root))
            cold.append(timed(store.pull, ref))
            cached.append(timed(store.pull, ref))
            size = store.get(ref).size
            shutil.rmtree(root)
        print(f"{label:<10} {size / 2**20:>9.1f} {median(cold):>8} {median(cached):>9}")


def create_table(work: Path, ref: str, runs: int) -> None:
    print("\n## create from a cached image (Debian), median of", runs, "\n")
    print(f"{'filesystem / method':<28} {'first s':>8} {'cached s':>9} {'space MiB':>10}")
    xfs_img, xfs_mnt = work / "xfs.img", work / "xfs"
    with open(xfs_img, "wb") as f:
        f.truncate(8 << 30)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(xfs_img)], check=True)
    xfs_mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(xfs_img), str(xfs_mnt)], check=True)
    try:
        for label, root in (("ext4 (copy, sparse)", work / "ext4-root"),
                            ("xfs (reflink)", xfs_mnt / "root")):
            manager = InstanceManager(root, Settings(accel="tcg"))
            asyncio.run(manager.image_pull(ref))
            create = in_loop(manager.create)
            first = timed(create, "first", oci=OciSource(reference=ref))
            times, spaces = [], []
            for i in range(runs):
                before = free_bytes(root)
                times.append(timed(create, f"vm{i}", oci=OciSource(reference=ref)))
                spaces.append(before - free_bytes(root))
            print(f"{label:<28} {first:>8.3f} {median(times):>9} "
                  f"{statistics.median(spaces) / 2**20:>10.1f}")
            if label.startswith("ext4"):
                base = next((root / "images" / "disks").iterdir())
                overlay = work / "overlay.qcow2"
                argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                        str(base), str(overlay), "2G"]
                qcow = [timed(subprocess.run, argv, check=True) for _ in range(runs)]
                print(f"{'ext4 qcow2 overlay (img only)':<28} {'':>8} {median(qcow):>9} "
                      f"{overlay.stat().st_blocks * 512 / 2**20:>10.1f}")
            for name in ["first", *(f"vm{i}" for i in range(runs))]:
                asyncio.run(manager.delete(name))
    finally:
        subprocess.run(["umount", str(xfs_mnt)], check=False)


def boot_table(manager: InstanceManager, refs: dict[str, tuple[str, int]], runs: int) -> None:
    print("\n## boot (median of", runs, "): start → agent answers, → the CMD serves HTTP\n")
    print(f"{'guest':<10} {'agent s':>8} {'serving s':>10}")
    # Untimed: the first start on a data root probes KVM (it boots the kernel once).
    asyncio.run(manager.create("warmup"))
    asyncio.run(manager.start("warmup"))
    asyncio.run(manager.delete("warmup", force=True))
    agent_times: list[float] = []
    for i in range(runs):
        name = f"builtin{i}"
        asyncio.run(manager.create(name))
        agent_times.append(timed(in_loop(manager.start), name))
        asyncio.run(manager.delete(name, force=True))
    print(f"{'built-in':<10} {median(agent_times):>8} {'-':>10}")
    for label, (ref, guest_port) in refs.items():
        agent_times, serving = [], []
        for i in range(runs):
            name, port = f"{label}{i}", free_port()
            asyncio.run(manager.create(name, oci=OciSource(reference=ref), port_forwards=[
                PortForward(host_port=port, guest_port=guest_port)]))
            start = time.perf_counter()
            asyncio.run(manager.start(name))
            agent_times.append(time.perf_counter() - start)
            http_ready(port, time.monotonic() + 60)
            serving.append(time.perf_counter() - start)
            asyncio.run(manager.delete(name, force=True))
        print(f"{label:<10} {median(agent_times):>8} {median(serving):>10}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work, manager = scratch_manager("torpor-image-bench-")
    try:
        layouts = Path(tempfile.mkdtemp(dir=work))
        busybox_image(layouts / "layout", "web")
        with docker_registry(work / "registry") as registry:
            refs = {"debian": f"{registry}/bench/debian:python",
                    "busybox": f"{registry}/bench/busybox:1"}
            push(debian_image(), "python", refs["debian"])
            push(layouts / "layout", "web", refs["busybox"])
            pull_table(work, refs)
            create_table(work, refs["debian"], args.runs)
            boot_table(manager, {"busybox": (refs["busybox"], 8080),
                                 "debian": (refs["debian"], 8000)}, args.runs)
    finally:
        remove_work(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
