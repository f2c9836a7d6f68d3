"""The relay of one instance's published ports, as the detached program torpor starts
before the instance's first QEMU (operations/network.py) and stops with the instance:

    python -m torpor.api.relay --lock-fd N --ready-fd N --identity FILE --targets FILE \
        --listen FD=KEY [--listen ...] [--instance NAME --standby-dir DIR \
        --data-root DIR --activity FILE]

The relay itself is network/publisher.py; this adds the daemon as its waker (a client
of the daemon, hence here): a connection while the instance is in standby asks the
daemon's `wake` (found as the CLI finds it, from this data root and the environment the
relay inherited) and tells it the wake's time. The starter's lock descriptor is
inherited: the relay runs as long as the lock is held. It writes its identity, then one
byte to `--ready-fd`: the starter returns only then, so a stop right after finds it."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

from torpor.network.publisher import Targets, Waker, parse_listen, serve

if TYPE_CHECKING:  # the client is loaded only when a wake needs it
    from torpor.api.client import RemoteManager


def _daemon(data_root: Path) -> RemoteManager:
    """The daemon's client, found afresh at each call (a restarted daemon is found)."""
    from torpor.api.client import RemoteManager
    from torpor.api.listen import find_daemon

    address = find_daemon(None, data_root)
    if address is None:
        raise ConnectionError("no daemon is configured for this data root")
    return RemoteManager(address.listen, address.token_file.read_text().strip())


def waker(name: str, standby_dir: Path, data_root: Path, activity: Path) -> Waker:
    def ask() -> None:
        _daemon(data_root).wake(name)

    def tell(ok: bool, seconds: float, error: str | None) -> None:
        _daemon(data_root).record_wake(name, ok=ok, seconds=seconds, error=error)

    return Waker(standby_dir, activity, ask, tell)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lock-fd", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--identity", type=Path, required=True)
    parser.add_argument("--targets", type=Path, required=True)
    parser.add_argument("--listen", action="append", default=[])
    parser.add_argument("--instance", help="wake on traffic: the instance's name")
    parser.add_argument("--standby-dir", type=Path, help="its standby state's directory")
    parser.add_argument("--data-root", type=Path, help="its data root (finds the daemon)")
    parser.add_argument("--activity", type=Path, help="its activity file")
    args = parser.parse_args()
    from torpor.fsutil import atomic_write_json, read_proc_stat

    stat = read_proc_stat(os.getpid())
    atomic_write_json(args.identity, {"pid": os.getpid(),
                                      "start_time": stat[1] if stat else 0})
    os.write(args.ready_fd, b"1")
    os.close(args.ready_fd)
    wakes = None
    if args.instance and args.standby_dir and args.data_root and args.activity:
        wakes = waker(args.instance, args.standby_dir, args.data_root, args.activity)
    asyncio.run(serve([parse_listen(item) for item in args.listen], Targets(args.targets),
                      wakes))
    args.identity.unlink(missing_ok=True)
    os.close(args.lock_fd)


if __name__ == "__main__":
    main()
