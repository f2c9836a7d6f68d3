"""CLI start-up benchmark: what a script calling `torpor` pays per call.

A memory-file guest (256 MiB) is created and booted in a fresh data root. Then, in the
same run and for each backend (in-process, then through a `torpor serve` daemon on the
data root's unix socket), the median wall time of:

- `python3 -c pass` (the interpreter alone: the floor),
- `python3 -c "import torpor.cli.main"` (what the CLI imports before it does anything),
- `torpor list`, `torpor show NAME`,
- `torpor standby NAME` and `torpor restore NAME`, beside the operation's own phase
  timing from the instance's record (standby: the `paused_window` and the whole
  operation; restore: `restore_to_agent`, what the user waits for). The difference is
  the CLI's own cost: start-up, config, daemon detection, output.

    .venv/bin/python -m bench.cli_bench [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The console script users run (what `pip install` made), else the module.
_SCRIPT = Path(sys.executable).parent / "torpor"
TORPOR = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "torpor.cli.main"]
NAME = "clib"


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def phases(root: Path, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([*TORPOR, "--data-root", str(root), "--local", "show", NAME,
                          "--json"], check=True, env=env, capture_output=True, text=True)
    last = json.loads(out.stdout)["last_operation"]
    return {k: float(v) for k, v in last["phases"].items()}


def measure(root: Path, env: dict[str, str], runs: int) -> list[tuple[str, float, str]]:
    cli = [*TORPOR, "--data-root", str(root)]
    rows = []
    for label, argv in (("python3 -c pass", [sys.executable, "-c", "pass"]),
                        ("import torpor.cli.main",
                         [sys.executable, "-c", "import torpor.cli.main"]),
                        ("torpor list", [*cli, "list"]),
                        (f"torpor show {NAME}", [*cli, "show", NAME])):
        rows.append((label, statistics.median(timed(argv, env) for _ in range(runs)), ""))
    standby, restore, paused, to_agent, standby_op = [], [], [], [], []
    for _ in range(runs):
        standby.append(timed([*cli, "standby", NAME], env))
        p = phases(root, env)
        paused.append(p["paused_window"])
        standby_op.append(sum(v for k, v in p.items()
                              if k in ("pause", "save", "stop", "flush-memory", "drop-cache",
                                       "persist")))
        restore.append(timed([*cli, "restore", NAME], env))
        to_agent.append(phases(root, env)["restore_to_agent"])
    med = statistics.median
    rows.append((f"torpor standby {NAME}", med(standby),
                 f"phases {med(standby_op) * 1000:.0f} ms (paused {med(paused) * 1000:.0f} ms)"))
    rows.append((f"torpor restore {NAME}", med(restore),
                 f"restore_to_agent {med(to_agent) * 1000:.0f} ms; CLI adds "
                 f"{(med(restore) - med(to_agent)) * 1000:.0f} ms"))
    return rows


def serve(root: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    daemon = subprocess.Popen([*TORPOR, "--data-root", str(root), "serve"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    socket_path = root / "torpord.sock"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = subprocess.run([*TORPOR, "--data-root", str(root), "operations"], env=env,
                               capture_output=True, check=False)
        if socket_path.exists() and probe.returncode == 0:
            return daemon
        time.sleep(0.1)
    daemon.kill()
    raise RuntimeError("the daemon did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tp-clibench-", dir="/var/tmp"))
    root = workdir / "data"
    env = dict(os.environ)
    cli = [*TORPOR, "--data-root", str(root)]
    daemon = None
    try:
        subprocess.run([*cli, "create", NAME, "--memory", "256M", "--memory-backing", "file"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run([*cli, "start", NAME], check=True, env=env, stdout=subprocess.DEVNULL)
        local = measure(root, env, args.runs)
        daemon = serve(root, env)
        remote = measure(root, env, args.runs)
        print(f"\nCLI wall time, median of {args.runs} ({os.cpu_count()} cores)\n")
        print(f"{'command':28} {'in-process':>11} {'via daemon':>11}   operation's own timing")
        for (label, a, note_a), (_, b, note_b) in zip(local, remote, strict=True):
            print(f"{label:28} {a * 1000:8.0f} ms {b * 1000:8.0f} ms   {note_a}")
            if note_b:
                print(f"{'':28} {'':11} {'':11}   via daemon: {note_b}")
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        subprocess.run([*cli, "--local", "delete", "--force", NAME], env=env,
                       capture_output=True, check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
