"""Every on-disk path torpor uses is built here, and nowhere else.

    <data-root>/
      instances/<id>/
        metadata.json            instance definition (atomic writes)
        disk.raw                 sparse writable root disk
        disk.overlay.qcow2       only while a snapshot copies the frozen disk (never copied)
        memory                   guest RAM in memory-file mode (sparse, shared mapping)
        logs/serial.log          guest console
        logs/qemu.log            QEMU's own messages
        run/                     runtime: QMP + agent sockets, pid file, runtime.json (never copied)
        snapshots/latest/        standby state (manifest.json + machine-state[.zst|.lz4])
        snapshots/.latest.partial/   a standby being written; .latest.consumed/: one a
                                 restore has loaded (never loaded again)
      snapshots/<id>/            stored snapshots: record.json + payload/
      locks/<id>.lock            per-instance operation locks; registry.lock for names;
                                 snapshot-<id>.lock: a stored snapshot's readers and job;
                                 compress-slot-<n>.lock: N background compressions at once
      jobs/<key>.lock|.json|.log a background job's lock, worker identity and log;
      jobs/stats.json            job counters (completed, preempted, skipped, bytes saved)
      images/<name>/             boot files (kernel, initrd) instances reference; read-only
      cache/                     probe results (accelerator)
      tmp/                       staging for instance creation, forks, images (each name
                                 ends in its builder's owner tag, `@<pid>-<start time>`)
      torpord.sock               the daemon's default socket (0600)
      api-token                  the daemon's bearer token (0600)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_ROOT = Path("/var/lib/torpor")
UNIX_PATH_MAX = 107
SNAPSHOT_STAGING_PREFIX = ".creating-"  # sun_path is 108 bytes including the terminating NUL


def resolve_data_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """--data-root wins, then $TORPOR_DATA_ROOT, then /var/lib/torpor."""
    if explicit:
        return Path(explicit).absolute()
    env = os.environ.get("TORPOR_DATA_ROOT")
    return Path(env).absolute() if env else DEFAULT_DATA_ROOT


def cache_home() -> Path:
    """Where built guest images are cached, outside any data root and the repo."""
    env = os.environ.get("TORPOR_CACHE_DIR")
    if env:
        return Path(env).absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "torpor"


def host_accel_cache(kernel_sha256: str) -> Path:
    """The KVM probe's verdict for a guest kernel (by content) on this host, shared by
    every data root: each new one would otherwise boot the kernel once more."""
    return cache_home() / "accel" / f"{kernel_sha256}.json"


@dataclass(frozen=True)
class InstancePaths:
    root: Path

    @property
    def metadata(self) -> Path:
        return self.root / "metadata.json"

    @property
    def disk(self) -> Path:
        return self.root / "disk.raw"

    @property
    def disk_overlay(self) -> Path:
        """Takes the guest's disk writes while a snapshot copies the frozen disk.raw;
        folded back afterwards (its presence after a crash says: fold it back first)."""
        return self.root / "disk.overlay.qcow2"

    @property
    def memory_file(self) -> Path:
        """Guest RAM in memory-file mode (sparse; exists while the VM runs or stands by)."""
        return self.root / "memory"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def serial_log(self) -> Path:
        return self.logs_dir / "serial.log"

    @property
    def app_log(self) -> Path:
        """An image instance's main process: its stdout and stderr (`torpor logs`)."""
        return self.logs_dir / "app.log"

    @property
    def exit_status(self) -> Path:
        """What an image instance's init wrote when its main process exited: the code."""
        return self.logs_dir / "exit-status"

    @property
    def publish_dir(self) -> Path:
        """The relay of an instance's published ports: not in run/ (which each QEMU
        start clears: the relay outlives QEMU), never copied (its process is this
        instance's alone)."""
        return self.root / "publish"

    @property
    def publisher_targets(self) -> Path:
        """Where each published port's connections go now (rewritten at each QEMU start
        of a user-mode instance, whose loopback forwards change)."""
        return self.publish_dir / "targets.json"

    @property
    def publisher_lock(self) -> Path:
        """Held by the relay while it runs."""
        return self.publish_dir / "relay.lock"

    @property
    def publisher_identity(self) -> Path:
        return self.publish_dir / "relay.json"

    @property
    def publisher_activity(self) -> Path:
        """The relay's connections now: open, held for a wake, and when that last
        changed (the daemon's idle clock reads it)."""
        return self.publish_dir / "activity.json"

    @property
    def hold_file(self) -> Path:
        """Until when the instance is held awake (`torpor hold`)."""
        return self.root / "hold.json"

    @property
    def publisher_log(self) -> Path:
        return self.logs_dir / "publisher.log"

    @property
    def qemu_log(self) -> Path:
        return self.logs_dir / "qemu.log"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def qmp_socket(self) -> Path:
        """Control monitor: used by the operation holding the instance lock."""
        return self.run_dir / "qmp.sock"

    @property
    def qmp_query_socket(self) -> Path:
        """Second monitor for read-only status queries, so `show` never waits on an operation."""
        return self.run_dir / "query.sock"

    @property
    def agent_socket(self) -> Path:
        """The guest agent's port as QEMUs started before session 17 served it (a unix
        socket); guest/agent.py still reaches those through it."""
        return self.run_dir / "agent.sock"

    @property
    def agent_pipe(self) -> Path:
        """The guest agent's port (a `pipe` chardev: FIFOs `agent.in`, `.out`). Clients
        pass this path; a QEMU without the FIFOs is reached at `agent_socket`."""
        return self.run_dir / "agent"

    @property
    def identity_pipe(self) -> Path:
        """The identity helper's port (guest/identity.py): FIFOs `identity.in`, `.out`."""
        return self.run_dir / "identity"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def runtime(self) -> Path:
        return self.run_dir / "runtime.json"

    @property
    def warm_record(self) -> Path:
        """A QEMU started ahead of this standby instance's restore (operations/warm.py)."""
        return self.run_dir / "warm.json"

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    @property
    def standby_dir(self) -> Path:
        return self.snapshots_dir / "latest"

    @property
    def standby_partial_dir(self) -> Path:
        """Where a standby save is written before it is renamed to `latest`."""
        return self.snapshots_dir / ".latest.partial"

    @property
    def standby_consumed_dir(self) -> Path:
        """A standby state a restore has loaded and set aside before the guest ran: never
        loaded again, removed once the restore ends (or by the next operation)."""
        return self.snapshots_dir / ".latest.consumed"

    def sockets(self) -> tuple[Path, ...]:
        return (self.qmp_socket, self.qmp_query_socket, self.agent_socket)


@dataclass(frozen=True)
class SnapshotPaths:
    """A stored snapshot: record.json plus payload/, a copy of the instance directory."""

    root: Path

    @property
    def record(self) -> Path:
        return self.root / "record.json"

    @property
    def payload(self) -> Path:
        return self.root / "payload"

    def payload_instance(self) -> InstancePaths:
        """The payload laid out like an instance directory (disk, metadata, state)."""
        return InstancePaths(self.payload)

    @property
    def pull_mark(self) -> Path:
        """While a pull builds it: which remote snapshot (operations/remote.PullMark)."""
        return self.root / "pull.json"


@dataclass(frozen=True)
class DataRoot:
    root: Path

    @property
    def instances_dir(self) -> Path:
        return self.root / "instances"

    @property
    def snapshots_dir(self) -> Path:
        return self.root / "snapshots"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    def image_dir(self, name: str) -> Path:
        return self.images_dir / name

    @property
    def oci_layout(self) -> Path:
        """One OCI image layout for every pulled or imported image: layers stored once."""
        return self.images_dir / "oci"

    @property
    def image_records_dir(self) -> Path:
        return self.images_dir / "records"

    def image_record(self, digest_hex: str) -> Path:
        return self.image_records_dir / f"{digest_hex}.json"

    @property
    def image_disks_dir(self) -> Path:
        return self.images_dir / "disks"

    def image_disk(self, digest_hex: str, carry_hash: str) -> Path:
        """An image's root filesystem with torpor's /.torpor in it, per image digest and
        carried-in recipe: instances copy it (reflink where the filesystem can)."""
        return self.image_disks_dir / f"{digest_hex}-{carry_hash}.ext4"

    @property
    def network_dir(self) -> Path:
        return self.root / "network"

    @property
    def network_leases(self) -> Path:
        """Bridged instances' addresses: address → instance id."""
        return self.network_dir / "leases.json"

    def dns_pid_file(self, bridge: str) -> Path:
        """The dnsmasq answering bridged guests' DNS on `bridge` writes its pid here."""
        return self.network_dir / f"dns-{bridge}.pid"

    def dns_log(self, bridge: str) -> Path:
        return self.network_dir / f"dns-{bridge}.log"

    @property
    def network_lock(self) -> Path:
        return self.locks_dir / "network.lock"

    @property
    def images_lock(self) -> Path:
        return self.locks_dir / "images.lock"

    @property
    def jobs_dir(self) -> Path:
        return self.root / "jobs"

    def job_lock(self, key: str) -> Path:
        return self.jobs_dir / f"{key}.lock"

    def job_worker(self, key: str) -> Path:
        return self.jobs_dir / f"{key}.json"

    def job_log(self, key: str) -> Path:
        return self.jobs_dir / f"{key}.log"

    @property
    def job_stats(self) -> Path:
        return self.jobs_dir / "stats.json"

    def compression_slot(self, index: int) -> Path:
        return self.locks_dir / f"compress-slot-{index}.lock"

    @property
    def registry_lock(self) -> Path:
        return self.locks_dir / "registry.lock"

    @property
    def daemon_lock(self) -> Path:
        """Held by the one daemon that serves this data root (its pid inside)."""
        return self.locks_dir / "daemon.lock"

    @property
    def accel_cache(self) -> Path:
        return self.cache_dir / "accel.json"

    @property
    def api_socket(self) -> Path:
        """The daemon's default listening socket for this data root."""
        return self.root / "torpord.sock"

    @property
    def api_token(self) -> Path:
        """The daemon's bearer token (0600), created on its first start."""
        return self.root / "api-token"

    def instance(self, instance_id: str) -> InstancePaths:
        return InstancePaths(self.instances_dir / instance_id)

    def snapshot(self, snapshot_id: str) -> SnapshotPaths:
        return SnapshotPaths(self.snapshots_dir / snapshot_id)

    def snapshot_lock(self, snapshot_id: str) -> Path:
        """Held by a stored snapshot's reader, and by its compression job to publish."""
        return self.locks_dir / f"snapshot-{snapshot_id}.lock"

    def instance_lock(self, instance_id: str) -> Path:
        return self.locks_dir / f"{instance_id}.lock"

    def staging(self, name: str) -> Path:
        """Where something is built before it is renamed into place. `name` carries its
        builder's owner tag (fsutil.owned_name), so a sweep can tell debris from work."""
        return self.tmp_dir / name

    def snapshot_staging(self, name: str) -> SnapshotPaths:
        """A snapshot being made, renamed to snapshots/<id> once complete (`name`: the
        id with its builder's owner tag)."""
        return SnapshotPaths(self.snapshots_dir / f"{SNAPSHOT_STAGING_PREFIX}{name}")

    def ensure(self) -> None:
        for d in (self.instances_dir, self.snapshots_dir, self.locks_dir, self.cache_dir,
                  self.tmp_dir, self.images_dir, self.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
