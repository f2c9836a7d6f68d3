"""Images through the daemon: pull, list, create an instance of one with overrides, its
logs, removal refused while it is used; and the CLI's create --image / logs through it."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.api.conftest import Daemon
from tests.api.test_api_guest import call, sh
from tests.conftest import torpor_cli
from tests.oci_helpers import push

pytestmark = pytest.mark.qemu


def test_images_and_image_instances_through_the_api(api: httpx.Client, daemon: Daemon,
                                                     registry: str, image_layout: Path) -> None:
    ref = f"{registry}/test/api:1"
    push(image_layout, "web", ref)
    pulled = call(api, "POST", "/images/pull", json={"reference": ref})
    assert pulled["references"] == [ref] and pulled["used_by"] == []
    assert [i["digest"] for i in call(api, "GET", "/images")] == [pulled["digest"]]
    created = call(api, "POST", "/instances", 201, json={
        "name": "apiimg", "image": ref, "env": ["WHO=api"],
        "cmd": ["sh", "-c", "echo hello $WHO; exec httpd -f -p 8080 -h /www"]})
    assert (created["image"], created["image_digest"]) == (ref, pulled["digest"])
    call(api, "POST", "/instances/apiimg/start", json={})
    assert sh(api, "apiimg", "wget -qO- http://127.0.0.1:8080/") == "hello from the image\n"
    assert call(api, "GET", "/images")[0]["used_by"] == ["apiimg"]
    refused = api.delete("/images", params={"reference": ref})
    assert refused.status_code == 409 and "apiimg" in refused.json()["message"]
    logs = api.get("/instances/apiimg/logs")
    assert logs.status_code == 200 and logs.content == b"hello api\n"
    # the CLI through the daemon: the same logs; an instance of the same image
    assert torpor_cli(daemon.data_root, "logs", "apiimg").stdout == "hello api\n"
    made = torpor_cli(daemon.data_root, "create", "cliimg", "--image", ref,
                      "--cmd", "sh -c 'echo from the cli; sleep 600'")
    assert made.returncode == 0, made.stderr
    bad = call(api, "POST", "/instances", 400, json={"name": "x", "image": ref,
                                                     "env": ["NOEQUALS"]})
    assert bad["code"] == "invalid_argument" and "body.env.0" in bad["message"]
    for name in ("apiimg", "cliimg"):
        call(api, "DELETE", f"/instances/{name}", 204, params={"force": True})
    assert api.delete("/images", params={"reference": ref}).status_code == 204
    assert call(api, "GET", "/images") == []
