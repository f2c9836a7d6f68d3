"""The address pool of one data root: a JSON file of leases (address → owner), changed
only under its lock and written atomically, so two creates never get one address and a
kill leaves the file whole. The bridge takes the subnet's first host address."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torpor.errors import Busy
from torpor.fsutil import atomic_write_json, read_json


@dataclass(frozen=True)
class Lease:
    address: str
    prefix: int
    gateway: str

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefix}"


class AddressPool:
    def __init__(self, subnet: str, leases: Path, lock: Path) -> None:
        self.network = ipaddress.IPv4Network(subnet)
        self.leases_file = leases
        self.lock_file = lock

    @property
    def gateway(self) -> str:
        return str(next(self.network.hosts()))

    def _lease(self, address: str) -> Lease:
        return Lease(address, self.network.prefixlen, self.gateway)

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, str]]:
        """The leases, under the pool's lock (changes to the dict are written back): the
        host side of the bridge is set up and torn down under it too, so the last
        release's teardown never races another instance's start."""
        self.lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                leases: dict[str, str] = read_json(self.leases_file)
            except FileNotFoundError:
                leases = {}
            before = dict(leases)
            yield leases
            if leases != before:
                self.leases_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.leases_file, leases)

    def allocate(self, owner: str) -> Lease:
        """The owner's address: the one it has, else the lowest free one."""
        with self.locked() as leases:
            for address, holder in leases.items():
                if holder == owner:
                    return self._lease(address)
            hosts = list(self.network.hosts())[1:]  # the first is the bridge's
            for host in hosts:
                if str(host) not in leases:
                    leases[str(host)] = owner
                    return self._lease(str(host))
        raise Busy(f"no free address in {self.network}: all {len(hosts)} are taken "
                   "(network.subnet sets the pool)")

    def release(self, owner: str) -> None:
        with self.locked() as leases:
            for address in [a for a, holder in leases.items() if holder == owner]:
                del leases[address]

    def owners(self) -> dict[str, str]:
        with self.locked() as leases:
            return dict(leases)

    def lease_of(self, owner: str) -> Lease | None:
        for address, holder in self.owners().items():
            if holder == owner:
                return self._lease(address)
        return None
