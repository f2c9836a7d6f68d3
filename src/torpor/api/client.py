"""The daemon's client: the same calls as InstanceManager, made over HTTP.

The CLI uses it when a daemon listens for the data root. Errors come back as the same
TorporError types (by their `code`), so the CLI reports them the same way either way.

Its calls are synchronous, on the standard library's http.client: a CLI call through the
daemon loads neither asyncio nor httpx (together ~0.15 s of import here, more than the
call itself; see bench/cli_bench.py). One connection per call: the progress display polls
from the main thread while a long call waits in another.
"""

from __future__ import annotations

import base64
import http.client
import json as jsonlib
import secrets
import socket
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlencode

from torpor import errors
from torpor.api import OPERATION_HEADER
from torpor.api.errors import Timeout, Unauthorized
from torpor.api.listen import ListenAddress
from torpor.guest.result import ExecResult

if TYPE_CHECKING:  # the answers are read through JsonView: see its docstring
    from torpor.api.models import Operation
    from torpor.images.source import OciSource
    from torpor.instances.info import InstanceInfo
    from torpor.instances.metadata import CompressionPolicy, MemoryBacking, NetworkMode
    from torpor.instances.snapshotrecord import SnapshotInfo
    from torpor.instances.states import TargetState
    from torpor.operations.remote import PushReport, RemoteDeleteReport, RemoteSnapshotInfo

_ERRORS: dict[str, type[errors.TorporError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.WrongState,
        errors.Busy,
        errors.AlreadyExists,
        errors.Unsupported,
        errors.OperationFailed,
        errors.IntegrityError,
        Unauthorized,
        Timeout,
    )
}


class JsonView(dict[str, Any]):
    """A daemon's JSON answer, read by attribute like the model it was dumped from
    (`info.last_operation.phases`), and still the mapping it came as (`phases.items()`,
    --json); timestamps (`*_at`, `*_until`) come back as datetimes. The CLI only reads answers, and
    validating them with the models would load pydantic (~0.1 s) on every call: the daemon
    validated them on the way out, and `openapi.json` is their schema."""

    def __getattr__(self, name: str) -> Any:
        try:
            return _view(self[name], name)
        except KeyError:
            raise AttributeError(name) from None

    def as_json(self) -> dict[str, Any]:
        return dict(self)


def _view(value: Any, name: str = "") -> Any:
    if isinstance(value, dict):
        return JsonView(value)
    if isinstance(value, list):
        return [_view(v) for v in value]
    if isinstance(value, str) and name.endswith(("_at", "_until")):
        return datetime.fromisoformat(value)
    return value


class DaemonError(errors.OperationFailed):
    code = "daemon_error"


def _raise_for(status: int, body: bytes) -> None:
    try:
        parsed = jsonlib.loads(body)
        code, message = str(parsed["code"]), str(parsed["message"])
    except (ValueError, KeyError, TypeError):
        raise DaemonError(
            f"daemon answered {status}: {body[:200].decode(errors='replace')}"
        ) from None
    raise _ERRORS.get(code, DaemonError)(message)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("torpord")
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _query(params: dict[str, Any] | None) -> str:
    if not params:
        return ""
    return "?" + urlencode(
        {k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()}
    )


class RemoteManager:
    """What the CLI needs of an InstanceManager, served by torpord."""

    remote = True  # the CLI asks this, not isinstance: it must not import httpx to ask

    def __init__(self, address: ListenAddress, token: str) -> None:
        self.address = address
        self._token = token
        self.next_operation: str | None = None  # names the next long request (progress)

    def _connection(self) -> http.client.HTTPConnection:
        if self.address.unix_path is not None:
            return _UnixConnection(str(self.address.unix_path))
        return http.client.HTTPConnection(self.address.host or "", self.address.port)

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        named: bool = True,
    ) -> bytes:
        """`named`: this request takes the operation id set in `next_operation` (not a
        progress poll, which runs beside the request it polls)."""
        headers = {"Authorization": f"Bearer {self._token}"}
        if named and self.next_operation is not None:
            headers[OPERATION_HEADER] = self.next_operation
            self.next_operation = None
        body = None
        if json is not None:
            body = jsonlib.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        connection = self._connection()
        try:
            connection.request(method, quote(path) + _query(params), body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonError(f"cannot reach the daemon at {self.address}: {exc}") from None
        finally:
            connection.close()
        if response.status >= 400:
            _raise_for(response.status, data)
        return data

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """The decoded JSON answer (`kw` as `_send` takes them)."""
        data = self._send(method, path, **kw)
        return jsonlib.loads(data) if data else None

    def _one(self, method: str, path: str, **kw: Any) -> Any:
        return JsonView(self.call(method, path, **kw))

    def _list(self, method: str, path: str, **kw: Any) -> Any:
        return [JsonView(item) for item in self.call(method, path, **kw)]

    @staticmethod
    def new_operation_id() -> str:
        return secrets.token_hex(8)

    def operations(self, instance: str | None = None) -> list[Operation]:
        return cast(
            "list[Operation]",
            self._list("GET", "/operations", params=_params(instance=instance), named=False),
        )

    def operation(self, op_id: str) -> Operation:
        return cast("Operation", self._one("GET", f"/operations/{op_id}", named=False))

    # --- the InstanceManager calls the CLI makes ------------------------------------

    def create(
        self,
        name: str,
        *,
        memory_bytes: int,
        cpus: int,
        disk_bytes: int,
        snapshot_policy: CompressionPolicy | None = None,
        memory_backing: MemoryBacking = "anonymous",
        oci: OciSource | None = None,
        network: NetworkMode | None = None,
        publish: list[str] | None = None,
        allow_peers: bool = False,
    ) -> InstanceInfo:
        body: dict[str, Any] = {
            "name": name,
            "memory_mib": memory_bytes >> 20,
            "cpus": cpus,
            "disk_mib": -(-disk_bytes // (1 << 20)),
            "memory_backing": memory_backing,
            "snapshot_policy": _dump(snapshot_policy),
            "network": network,
            "publish": publish or [],
            "allow_peers": allow_peers,
        }
        if oci is not None:
            body.update(image=oci.reference, entrypoint=oci.entrypoint, cmd=oci.cmd,
                        env=oci.env, workdir=oci.workdir, user=oci.user, insecure=oci.insecure)
        return cast("InstanceInfo", self._one("POST", "/instances", json=body))

    def delete(self, name: str, *, force: bool = False) -> None:
        self.call("DELETE", f"/instances/{name}", params={"force": force})

    def start(self, name: str, *, wait_agent: bool = True) -> InstanceInfo:
        return cast(
            "InstanceInfo",
            self._one("POST", f"/instances/{name}/start", json={"wait_agent": wait_agent}),
        )

    def stop(self, name: str, *, timeout: float | None = None, force: bool = False) -> InstanceInfo:
        body: dict[str, Any] = {"force": force}
        if timeout is not None:
            body["timeout"] = timeout
        return cast("InstanceInfo", self._one("POST", f"/instances/{name}/stop", json=body))

    def standby(self, name: str, policy: CompressionPolicy | None = None) -> InstanceInfo:
        return cast(
            "InstanceInfo",
            self._one("POST", f"/instances/{name}/standby", json={"compression": _dump(policy)}),
        )

    def restore(self, name: str) -> InstanceInfo:
        return cast("InstanceInfo", self._one("POST", f"/instances/{name}/restore"))

    def resume(self, name: str) -> InstanceInfo:
        return cast("InstanceInfo", self._one("POST", f"/instances/{name}/resume"))

    def set_policy(self, name: str, policy: CompressionPolicy | None) -> None:
        self.call("PUT", f"/instances/{name}/policy", json={"policy": _dump(policy)})

    def set_auto_standby(self, name: str, seconds: float | None) -> None:
        self.call("PUT", f"/instances/{name}/policy", json={"auto_standby": seconds})

    def hold(self, name: str, seconds: float) -> InstanceInfo:
        return cast("InstanceInfo", self._one("POST", f"/instances/{name}/hold",
                                              json={"duration": seconds}))

    def release(self, name: str) -> InstanceInfo:
        return cast("InstanceInfo", self._one("DELETE", f"/instances/{name}/hold"))

    def wake(self, name: str) -> bool:
        """Traffic for `name` (a relay's call): restored if in standby."""
        return bool(self.call("POST", f"/instances/{name}/wake")["woke"])

    def record_wake(self, name: str, *, ok: bool, seconds: float,
                    error: str | None = None) -> None:
        self.call("POST", f"/instances/{name}/wakes",
                  json={"ok": ok, "seconds": seconds, "error": error})

    def get(self, name: str) -> InstanceInfo:
        return cast("InstanceInfo", self._one("GET", f"/instances/{name}"))

    def list_all(self) -> list[InstanceInfo]:
        return cast("list[InstanceInfo]", self._list("GET", "/instances"))

    def exec(
        self, name: str, argv: list[str], *, input: bytes | None = None, timeout: float = 60.0
    ) -> ExecResult:
        body = {
            "argv": argv,
            "timeout": timeout,
            "stdin_b64": base64.b64encode(input).decode() if input else None,
        }
        result = self.call("POST", f"/instances/{name}/exec", json=body)
        return ExecResult(
            exit_code=result["exit_code"],
            signal=result["signal"],
            stdout=base64.b64decode(result["stdout_b64"]),
            stderr=base64.b64decode(result["stderr_b64"]),
            truncated=result.get("truncated", False),
        )

    def fork(
        self, source: str, new_name: str, *, count: int = 1, target_state: TargetState = "running"
    ) -> list[InstanceInfo]:
        return self._forks(f"/instances/{source}/fork", new_name, count, target_state)

    def snapshot_create(
        self,
        name: str,
        snapshot_name: str,
        tags: dict[str, str] | None = None,
        *,
        serial: bool = False,
        compression: CompressionPolicy | None = None,
    ) -> SnapshotInfo:
        body = {
            "name": snapshot_name,
            "tags": tags or {},
            "serial": serial,
            "compression": _dump(compression),
        }
        return cast("SnapshotInfo", self._one("POST", f"/instances/{name}/snapshots", json=body))

    def snapshot_list(self, source: str | None = None) -> list[SnapshotInfo]:
        return cast(
            "list[SnapshotInfo]", self._list("GET", "/snapshots", params=_params(instance=source))
        )

    def snapshot_get(self, snapshot: str, source: str | None = None) -> SnapshotInfo:
        return cast(
            "SnapshotInfo",
            self._one("GET", f"/snapshots/{snapshot}", params=_params(instance=source)),
        )

    def snapshot_delete(self, snapshot: str, source: str | None = None) -> None:
        self.call("DELETE", f"/snapshots/{snapshot}", params=_params(instance=source))

    def snapshot_restore(self, name: str, snapshot: str) -> InstanceInfo:
        return cast(
            "InstanceInfo", self._one("POST", f"/instances/{name}/snapshots/{snapshot}/restore")
        )

    def snapshot_push(self, snapshot: str, url: str, *, source: str | None = None,
                      remote_name: str | None = None) -> PushReport:
        return cast("PushReport", self._one(
            "POST", f"/snapshots/{snapshot}/push", json={"url": url, "name": remote_name},
            params=_params(instance=source)))

    def snapshot_pull(self, url: str, *, name: str | None = None) -> SnapshotInfo:
        return cast("SnapshotInfo", self._one("POST", "/snapshots/pull",
                                              json={"url": url, "name": name}))

    def remote_list(self, url: str) -> list[RemoteSnapshotInfo]:
        return cast("list[RemoteSnapshotInfo]",
                    self._list("GET", "/remote-snapshots", params={"url": url}))

    def remote_delete(self, url: str) -> RemoteDeleteReport:
        return cast("RemoteDeleteReport",
                    self._one("DELETE", "/remote-snapshots", params={"url": url}))

    def snapshot_fork(
        self,
        snapshot: str,
        new_name: str,
        *,
        count: int = 1,
        target_state: TargetState = "running",
        source: str | None = None,
    ) -> list[InstanceInfo]:
        return self._forks(f"/snapshots/{snapshot}/fork", new_name, count, target_state,
                           params=_params(instance=source))

    def _forks(self, path: str, new_name: str, count: int, target_state: TargetState,
               **kw: Any) -> list[InstanceInfo]:
        body = {"new_name": new_name, "count": count, "target_state": target_state}
        return cast("list[InstanceInfo]", self._list("POST", path, json=body, **kw))

    def console(self, name: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        return self._send(
            "GET", f"/instances/{name}/console", params={"offset": offset, "limit": limit}
        )

    def logs(self, name: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        return self._send(
            "GET", f"/instances/{name}/logs", params={"offset": offset, "limit": limit}
        )


def _dump(policy: CompressionPolicy | None) -> dict[str, Any] | None:
    """The library's policy in the API's per-codec shape."""
    if policy is None:
        return None
    if str(policy.codec) == "none":
        return {"codec": "none"}
    return {
        "codec": str(policy.codec),
        "level": policy.level,
        "mode": policy.mode,
        "delay_s": policy.delay_s,
    }


def _params(**values: str | None) -> dict[str, str]:
    return {k: v for k, v in values.items() if v is not None}
