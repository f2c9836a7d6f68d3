"""A bounded schemathesis run against the committed OpenAPI document, on a real daemon
(over TCP) with a real data root: no 500, no crash, responses as documented."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import CheckFunction
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import negative_data_rejection

from tests.api.conftest import Daemon, free_port, start_daemon, stop_daemon
from torpor.operations.create import host_memory_bytes

SPEC = Path(__file__).resolve().parents[2] / "openapi.json"
schema = schemathesis.openapi.from_path(SPEC)
checks = schema.config.checks
# The bar: no 500. A 502 is the documented answer when QEMU or the host fails.
checks.not_a_server_error.expected_statuses = ["2xx", "3xx", "4xx", "501", "502"]
# Valid requests about instances in the wrong state get 409, and a wait that times out
# 408: documented outcomes, not rejections of valid data.
checks.positive_data_acceptance.expected_statuses = [
    *checks.positive_data_acceptance.expected_statuses, "408"]
EXAMPLES_PER_OPERATION = 50
MAX_WAIT = 0.5
REQUEST_TIMEOUT = 180


@pytest.fixture(scope="module")
def tcp_daemon() -> Iterator[Daemon]:
    daemon = start_daemon(listen=f"127.0.0.1:{free_port()}")
    yield daemon
    assert stop_daemon(daemon) == 0, (daemon.data_root / "torpord.log").read_text()


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_api_conforms(case: schemathesis.Case, tcp_daemon: Daemon) -> None:
    if case.path.endswith("/wait") and isinstance(case.query, dict):
        # A wait for a state that never comes lasts its whole (valid) timeout, 60 s by
        # default: keep the run bounded. The 408 path is what this still exercises.
        # (Query values may come as strings: "3600.0" is a valid hour-long wait too.)
        timeout = case.query.get("timeout")
        try:
            seconds = float(timeout) if timeout is not None else None
        except (TypeError, ValueError):
            seconds = None  # not a number: a rejection, quick
        if timeout is None or (seconds is not None and seconds > MAX_WAIT):
            case.query["timeout"] = MAX_WAIT
    if isinstance(case.body, dict):
        # Generated image references would name Docker Hub and the like: point every one
        # at a loopback port where nothing listens (the daemon's proxy catches the rest).
        for key in ("image", "reference"):
            if isinstance(case.body.get(key), str):
                case.body[key] = "127.0.0.1:9/fuzz/image:1"
        # The network rule: this daemon runs in the machine's own namespace, so no bridge
        # or TAP (those are tested in namespaces of their own, tests/network), and a
        # published port listens on loopback only.
        if case.body.get("network") == "bridge":
            case.body["network"] = "user"
        case.body.pop("allow_peers", None)  # bridge only
        # A guest larger than the host is refused (400): the host's RAM is no schema's.
        memory, host_mib = case.body.get("memory_mib"), host_memory_bytes() >> 20
        if isinstance(memory, int | float) and not isinstance(memory, bool) \
                and memory > host_mib:
            case.body["memory_mib"] = host_mib
        if isinstance(case.body.get("publish"), list):
            case.body["publish"] = [on_loopback(item) for item in case.body["publish"]]
    # A generated fork of count 10 boots 10 guests under TCG: well past the default 10 s.
    case.call_and_validate(base_url=tcp_daemon.base_url,
                           headers={"Authorization": f"Bearer {tcp_daemon.token}"},
                           excluded_checks=untyped_query_false_positive(case),
                           timeout=REQUEST_TIMEOUT)


def on_loopback(spec: object) -> object:
    """A generated [HOST_IP:]HOST_PORT:GUEST_PORT with its host address made 127.0.0.1."""
    if not isinstance(spec, str):
        return spec
    ports = spec.rsplit(":", 2)[-2:]
    return "127.0.0.1:" + ":".join(ports)


def untyped_query_false_positive(case: schemathesis.Case) -> list[CheckFunction]:
    """Query strings carry no types: a "negative" `?instance=false` is a valid name
    (schemathesis issue #2312). Only then is negative_data_rejection left out; a
    "negative" Authorization header beside it does not count, as the call replaces it
    with the daemon's token."""
    meta = case.meta
    if meta is None:
        return []
    negative = {loc for loc, info in meta.components.items() if info.mode.is_negative}
    if ParameterLocation.HEADER in negative and set(case.headers or {}) <= {"Authorization"}:
        negative.discard(ParameterLocation.HEADER)
    return [negative_data_rejection] if negative == {ParameterLocation.QUERY} else []
