"""The restore pool (issue #22, item 4): a memory-file guest's restore through the daemon,
with a QEMU waiting for it (TORPOR_RESTORE_POOL=1) and without (=0), same guest, same run.

One memory-file guest on a scratch data root; the daemon is started with the pool off,
then on, alternating (--blocks pairs of blocks of --runs standby/restore cycles each).
With the pool on, each restore starts once the daemon's QEMU for it is waiting (the pool
fills right after a standby: a restore arriving sooner starts its own, as without the
pool). Printed: medians of restore to running and to agent-responsive (the operation's
own phases), the client's wall time of the restore call, and ratios.

    .venv/bin/python -m bench.pool_bench [--runs 8] [--blocks 2] [--memory 512M]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import remove_work
from torpor.api.client import RemoteManager
from torpor.api.listen import ListenAddress
from torpor.operations import warm
from torpor.paths import DataRoot
from torpor.units import parse_size


def start_daemon(root: Path, pool: int) -> tuple[subprocess.Popen[bytes], RemoteManager]:
    socket_path = root / "torpord.sock"
    env = dict(os.environ, TORPOR_DATA_ROOT=str(root), TORPOR_RESTORE_POOL=str(pool))
    log = open(root / f"torpord-{pool}.log", "ab")  # noqa: SIM115 - the daemon's lifetime
    process = subprocess.Popen([sys.executable, "-m", "torpor.cli.main", "serve"],
                               env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while not (socket_path.exists() and (root / "api-token").exists()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the daemon did not start: see {root}/torpord-{pool}.log")
        time.sleep(0.05)
    token = (root / "api-token").read_text().strip()
    client = RemoteManager(ListenAddress(unix_path=socket_path), token)
    while True:
        try:
            client.list_all()
            return process, client
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def stop_daemon(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def cycles(client: RemoteManager, root: DataRoot, instance_id: str, runs: int,
           pooled: bool) -> list[tuple[float, float, float]]:
    paths = root.instance(instance_id)
    found = []
    for _ in range(runs):
        client.standby("g")
        if pooled:
            deadline = time.monotonic() + 30
            while warm.owned_alive(paths) is None:
                if time.monotonic() > deadline:
                    raise SystemExit("the pool started no QEMU for the guest")
                time.sleep(0.01)
        time.sleep(0.5)  # both kinds alike: the host settles after the standby
        start = time.monotonic()
        info = client.restore("g")
        wall = time.monotonic() - start
        assert info.last_operation is not None
        phases = info.last_operation.phases
        found.append((phases["restore_to_running"], phases["restore_to_agent"], wall))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--memory", default="512M")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tp-poolbench-", dir="/var/tmp"))
    root = work / "data"
    root.mkdir()
    results: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    process = None
    try:
        process, client = start_daemon(root, 0)
        info = client.create("g", memory_bytes=parse_size(args.memory), cpus=1,
                             disk_bytes=2 << 30, memory_backing="file")
        client.start("g")
        instance_id = info.id
        stop_daemon(process)
        for _ in range(args.blocks):
            for pooled in (False, True):
                process, client = start_daemon(root, int(pooled))
                results[pooled] += cycles(client, DataRoot(root), instance_id, args.runs,
                                          pooled)
                stop_daemon(process)
                process = None
        process, client = start_daemon(root, 0)
        client.delete("g", force=True)
    finally:
        if process is not None:
            stop_daemon(process)
        remove_work(work)
    print(f"\nmemory-file guest of {args.memory}, restore through the daemon, medians of "
          f"{args.runs * args.blocks} (ms)\n")
    print(f"{'':28} {'to running':>11} {'to agent':>10} {'call (client)':>14}")
    medians = {}
    for pooled in (False, True):
        columns = [statistics.median(c) * 1000 for c in zip(*results[pooled], strict=True)]
        medians[pooled] = columns
        label = "pool: a QEMU waiting" if pooled else "no pool (QEMU started)"
        print(f"{label:28} {columns[0]:11.1f} {columns[1]:10.1f} {columns[2]:14.1f}")
    ratio = [p / n for p, n in zip(medians[True], medians[False], strict=True)]
    print(f"{'pool / no pool':28} {ratio[0]:10.2f}x {ratio[1]:9.2f}x {ratio[2]:13.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
