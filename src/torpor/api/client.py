"""The daemon's client: the same calls as InstanceManager, made over HTTP.

The CLI uses it when a daemon listens for the data root. Errors come back as the same
TorporError types (by their `code`), so the CLI reports them the same way either way.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from torpor import errors
from torpor.api.errors import Timeout, Unauthorized
from torpor.api.models import OPERATION_HEADER, ExecResponse, Operation
from torpor.codec import Codec
from torpor.config import ListenAddress
from torpor.guest.agent import ExecResult
from torpor.instances.info import InstanceInfo
from torpor.instances.metadata import CompressionPolicy, MemoryBacking
from torpor.instances.snapshotrecord import SnapshotRecord
from torpor.instances.states import TargetState

M = TypeVar("M", bound=BaseModel)
_ERRORS: dict[str, type[errors.TorporError]] = {
    cls.code: cls for cls in (
        errors.InvalidArgument, errors.NotFound, errors.WrongState, errors.Busy,
        errors.AlreadyExists, errors.Unsupported, errors.OperationFailed,
        errors.IntegrityError, Unauthorized, Timeout)
}


class DaemonError(errors.OperationFailed):
    code = "daemon_error"


def _raise_for(response: httpx.Response) -> None:
    try:
        body = response.json()
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        raise DaemonError(f"daemon answered {response.status_code}: "
                          f"{response.text[:200]}") from None
    raise _ERRORS.get(code, DaemonError)(message)


class RemoteManager:
    """What the CLI needs of an InstanceManager, served by torpord."""

    remote = True  # the CLI asks this, not isinstance: it must not import httpx to ask

    def __init__(self, address: ListenAddress, token: str) -> None:
        self.address = address
        self._token = token
        self.next_operation: str | None = None  # names the next long request (progress)

    def _client(self) -> httpx.AsyncClient:
        if self.address.unix_path is not None:
            transport = httpx.AsyncHTTPTransport(uds=str(self.address.unix_path))
            base = "http://torpord"
        else:
            transport = httpx.AsyncHTTPTransport()
            host = self.address.host or ""
            base = f"http://{f'[{host}]' if ':' in host else host}:{self.address.port}"
        return httpx.AsyncClient(transport=transport, base_url=base,
                                 headers={"Authorization": f"Bearer {self._token}"},
                                 timeout=httpx.Timeout(None, connect=10))

    async def _send(self, method: str, path: str, *, json: Any = None,
                    params: dict[str, Any] | None = None) -> httpx.Response:
        headers = {}
        if self.next_operation is not None:
            headers[OPERATION_HEADER] = self.next_operation
            self.next_operation = None
        async with self._client() as client:
            try:
                response = await client.request(method, path, json=json, params=params,
                                                headers=headers)
            except httpx.TransportError as exc:
                raise DaemonError(f"cannot reach the daemon at {self.address}: {exc}") from None
        if response.status_code >= 400:
            _raise_for(response)
        return response

    async def call(self, method: str, path: str, *, json: Any = None,
                   params: dict[str, Any] | None = None) -> Any:
        response = await self._send(method, path, json=json, params=params)
        return response.json() if response.content else None

    async def _model(self, model: type[M], method: str, path: str, **kw: Any) -> M:
        return model.model_validate(await self.call(method, path, **kw))

    async def _list(self, model: type[M], method: str, path: str, **kw: Any) -> list[M]:
        return TypeAdapter(list[model]).validate_python(  # type: ignore[valid-type]
            await self.call(method, path, **kw))

    @staticmethod
    def new_operation_id() -> str:
        return secrets.token_hex(8)

    async def operations(self, instance: str | None = None) -> list[Operation]:
        return await self._list(Operation, "GET", "/operations",
                                params=_params(instance=instance))

    async def operation(self, op_id: str) -> Operation:
        return await self._model(Operation, "GET", f"/operations/{op_id}")

    # --- the InstanceManager calls the CLI makes ------------------------------------

    async def create(self, name: str, *, memory_bytes: int, cpus: int, disk_bytes: int,
                     snapshot_policy: CompressionPolicy | None = None,
                     memory_backing: MemoryBacking = "anonymous") -> InstanceInfo:
        body = {"name": name, "memory_mib": memory_bytes >> 20, "cpus": cpus,
                "disk_mib": -(-disk_bytes // (1 << 20)), "memory_backing": memory_backing,
                "snapshot_policy": _dump(snapshot_policy)}
        return await self._model(InstanceInfo, "POST", "/instances", json=body)

    async def delete(self, name: str, *, force: bool = False) -> None:
        await self.call("DELETE", f"/instances/{name}", params={"force": force})

    async def start(self, name: str, *, wait_agent: bool = True) -> InstanceInfo:
        return await self._model(InstanceInfo, "POST", f"/instances/{name}/start",
                                  json={"wait_agent": wait_agent})

    async def stop(self, name: str, *, timeout: float | None = None,
                   force: bool = False) -> InstanceInfo:
        body: dict[str, Any] = {"force": force}
        if timeout is not None:
            body["timeout"] = timeout
        return await self._model(InstanceInfo, "POST", f"/instances/{name}/stop", json=body)

    async def standby(self, name: str, policy: CompressionPolicy | None = None
                      ) -> InstanceInfo:
        return await self._model(InstanceInfo, "POST", f"/instances/{name}/standby",
                                  json={"compression": _dump(policy)})

    async def restore(self, name: str) -> InstanceInfo:
        return await self._model(InstanceInfo, "POST", f"/instances/{name}/restore")

    async def resume(self, name: str) -> InstanceInfo:
        return await self._model(InstanceInfo, "POST", f"/instances/{name}/resume")

    async def set_policy(self, name: str, policy: CompressionPolicy | None) -> None:
        await self.call("PUT", f"/instances/{name}/policy", json={"policy": _dump(policy)})

    async def get(self, name: str) -> InstanceInfo:
        return await self._model(InstanceInfo, "GET", f"/instances/{name}")

    async def list_all(self) -> list[InstanceInfo]:
        return await self._list(InstanceInfo, "GET", "/instances")

    async def exec(self, name: str, argv: list[str], *, input: bytes | None = None,
                   timeout: float = 60.0) -> ExecResult:
        body = {"argv": argv, "timeout": timeout,
                "stdin_b64": base64.b64encode(input).decode() if input else None}
        result = await self._model(ExecResponse, "POST", f"/instances/{name}/exec", json=body)
        return ExecResult(exit_code=result.exit_code, signal=result.signal,
                          stdout=base64.b64decode(result.stdout_b64),
                          stderr=base64.b64decode(result.stderr_b64))

    async def fork(self, source: str, new_name: str, *, count: int = 1,
                   target_state: TargetState = "running") -> list[InstanceInfo]:
        return await self._list(InstanceInfo, "POST", f"/instances/{source}/fork",
                                json={"new_name": new_name, "count": count,
                                      "target_state": target_state})

    async def snapshot_create(self, name: str, snapshot_name: str,
                              tags: dict[str, str] | None = None, *, serial: bool = False,
                              compression: CompressionPolicy | None = None) -> SnapshotRecord:
        body = {"name": snapshot_name, "tags": tags or {}, "serial": serial,
                "compression": _dump(compression)}
        return await self._model(SnapshotRecord, "POST", f"/instances/{name}/snapshots",
                                  json=body)

    async def snapshot_list_async(self, source: str | None = None) -> list[SnapshotRecord]:
        return await self._list(SnapshotRecord, "GET", "/snapshots",
                                params=_params(instance=source))

    async def snapshot_get_async(self, snapshot: str, source: str | None = None
                                 ) -> SnapshotRecord:
        return await self._model(SnapshotRecord, "GET", f"/snapshots/{snapshot}",
                                 params=_params(instance=source))

    async def snapshot_delete(self, snapshot: str, source: str | None = None) -> None:
        await self.call("DELETE", f"/snapshots/{snapshot}", params=_params(instance=source))

    async def snapshot_restore(self, name: str, snapshot: str) -> InstanceInfo:
        return await self._model(InstanceInfo, "POST",
                                 f"/instances/{name}/snapshots/{snapshot}/restore")

    async def snapshot_fork(self, snapshot: str, new_name: str, *, count: int = 1,
                            target_state: TargetState = "running",
                            source: str | None = None) -> list[InstanceInfo]:
        return await self._list(InstanceInfo, "POST", f"/snapshots/{snapshot}/fork",
                                json={"new_name": new_name, "count": count,
                                      "target_state": target_state},
                                params=_params(instance=source))

    async def console(self, name: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        response = await self._send("GET", f"/instances/{name}/console",
                                    params={"offset": offset, "limit": limit})
        return response.content


def _dump(policy: CompressionPolicy | None) -> dict[str, Any] | None:
    """The library's policy in the API's per-codec shape."""
    if policy is None:
        return None
    if policy.codec is Codec.NONE:
        return {"codec": "none"}
    return {"codec": str(policy.codec), "level": policy.level, "mode": policy.mode,
            "delay_s": policy.delay_s}


def _params(**values: str | None) -> dict[str, str]:
    return {k: v for k, v in values.items() if v is not None}
